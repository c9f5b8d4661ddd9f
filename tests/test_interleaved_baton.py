"""The turn-taking of ``benchmarks/interleaved.py``: one fit steps at a time, each once per round."""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from interleaved import Baton  # noqa: E402


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
