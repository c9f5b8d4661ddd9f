"""The turn-taking of ``benchmarks/interleaved.py``: one fit steps at a time, each once per round."""

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead  # noqa: E402
from interleaved import (  # noqa: E402
    SWITCHED_OFF,
    Baton,
    SwitchedOffWatch,
    between_fits,
    fit_names,
    pool_fits,
    split_by_presence,
)


def run_in_turns(blocks: dict[str, int]) -> list[str]:
    """Each name takes its turn ``blocks[name]`` times, then finishes; returns the order of turns."""
    baton, order, lock, running = Baton(list(blocks)), [], threading.Lock(), []

    def worker(name: str) -> None:
        try:
            for _ in range(blocks[name]):
                baton.wait(name)
                with lock:
                    running.append(name)
                    assert len(running) == 1, running  # nobody else steps during this turn
                    order.append(name)
                    running.remove(name)
                baton.pass_on(name)
        finally:
            baton.pass_on(name, finished=True)

    threads = [threading.Thread(target=worker, args=(name,)) for name in blocks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a fit waited forever for its turn"
    return order


def test_every_fit_takes_one_turn_per_round_in_a_shuffled_order():
    order = run_in_turns({"bare": 40, "a": 40, "b": 40})
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 40 and all(sorted(r) == ["a", "b", "bare"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not always the same order


def test_a_fit_that_ends_early_does_not_stop_the_others():
    order = run_in_turns({"bare": 20, "short": 3, "b": 20})
    assert order.count("short") == 3 and order.count("bare") == 20 and order.count("b") == 20


def test_the_split_gives_spikewatch_against_itself_off_and_off_against_bare():
    blocks = {"bare": [1.0, 1.0, 1.0], "spikewatch": [1.05, 1.06, 1.04], SWITCHED_OFF: [1.02, 1.02, 1.02]}
    split = split_by_presence(blocks)
    assert split["own work"]["ratio_median"] == pytest.approx(1.05 / 1.02)  # the median round
    assert split["presence"]["ratio_median"] == pytest.approx(1.02)
    assert split_by_presence({"bare": [1.0], "spikewatch": [1.1]}) == {}  # no switched-off fit: no split


def test_several_fits_of_a_variant_are_timed_by_their_mean_and_compared_with_the_first():
    assert fit_names("bare", 3) == ["bare", "bare #2", "bare #3"] and fit_names("bare", 1) == ["bare"]
    blocks = {
        "bare": [1.0, 1.0, 1.0],
        "bare #2": [1.1, 1.1, 1.1],  # the same code, landed 10% dearer for the whole fit
        "spikewatch": [1.2, 1.2, 1.2, 1.2],  # a fit that reached one round more than the others
        "spikewatch #2": [1.0, 1.0, 1.0],
    }
    pooled = pool_fits(blocks, ["bare", "spikewatch"], 2)
    assert pooled["bare"] == pytest.approx([1.05] * 3) and pooled["spikewatch"] == pytest.approx([1.1] * 3)
    spread = between_fits(blocks, ["bare", "spikewatch"], 2)
    assert [row["fit"] for row in spread["bare"]] == ["bare #2"]
    assert spread["bare"][0]["ratio_median"] == pytest.approx(1.1)
    assert spread["spikewatch"][0]["ratio_median"] == pytest.approx(1.0 / 1.2)
    assert between_fits({"bare": [1.0]}, ["bare"], 1) == {}  # one fit each: nothing to compare


def test_a_switched_off_spikewatch_sees_no_step_and_leaves_the_strategy_as_it_was(tmp_path):
    watch = SwitchedOffWatch(log_dir=tmp_path, print_spikes=False, print_summary=False)
    workload = overhead.WORKLOADS["seed_mlp"]
    trainer = overhead.quiet_trainer(100, "cpu", [watch])
    trainer.fit(workload.model(), workload.loader(100))
    assert watch.steps_watched == 0 and watch.spikes == []
    assert "training_step" not in vars(trainer.strategy)
