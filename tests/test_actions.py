"""The action policy and the skip list, with plain numbers: no Lightning, no training."""

import math

import pytest

from lightning_spikewatch.actions import Action, ActionPolicy, ActionTaken, SkipEntry, SkipList, stronger
from lightning_spikewatch.events import Cause


def test_skip_and_stop_act_on_every_cause_unless_limited():
    skip = ActionPolicy.build("skip")
    assert skip.decide(Cause.SHORT_BATCH, 1.0, 2.0).action is Action.SKIP
    limited = ActionPolicy.build("stop", ["outlier_sample", "non_finite"])
    assert limited.decide(Cause.SHORT_BATCH, 1.0, 2.0) is None
    assert limited.decide(Cause.NON_FINITE, math.nan, 2.0).action is Action.STOP


def test_clip_scales_the_gradient_norm_down_to_the_bound():
    clip = ActionPolicy.build("clip")
    taken = clip.decide(Cause.LAYER_GRADIENT, 50.0, 2.0)
    assert taken.action is Action.CLIP and taken.factor == pytest.approx(0.04)
    assert "50" in taken.reason and "2" in taken.reason


def test_clip_leaves_a_gradient_within_the_bound_alone_and_drops_a_non_finite_one():
    clip = ActionPolicy.build("clip")
    assert clip.decide(Cause.OUTLIER_SAMPLE, 1.5, 2.0) is None  # the loss spiked, the gradient did not
    assert clip.decide(Cause.OUTLIER_SAMPLE, 1.5, None) is None  # no bound before warm-up
    assert clip.decide(Cause.NON_FINITE, math.inf, 2.0).action is Action.SKIP


def test_the_stronger_action_wins_within_one_step():
    clip, skip = ActionTaken(Action.CLIP, "c", 0.5), ActionTaken(Action.SKIP, "s")
    assert stronger(clip, skip) is skip and stronger(skip, clip) is skip
    assert stronger(None, clip) is clip and stronger(None, None) is None


def test_action_record_round_trips_through_its_dict():
    taken = ActionTaken(Action.CLIP, "gradient norm 9 clipped to 3", 1 / 3)
    assert ActionTaken.from_dict(taken.to_dict()) == taken


def entry(step: int, fingerprint: tuple, rank: int = 0) -> SkipEntry:
    return SkipEntry(step=step, epoch=0, batch_idx=step, fingerprint=fingerprint, rank=rank)


def test_skip_list_matches_by_content_once_and_remembers_what_it_consumed():
    listed = SkipList()
    listed.add([entry(40, (32.0, 1.5, 7.25)), entry(90, (32.0, -3.0, 9.0))])
    assert listed.match((32.0, 1.5, 7.26)) is None  # a different batch
    assert listed.match((32.0, 1.5 * (1 + 1e-8), 7.25)).step == 40  # the same batch, float32 rounding
    assert listed.match((32.0, 1.5, 7.25)) is None  # skipped once only
    listed.add([entry(40, (32.0, 1.5, 7.25))])  # re-read from the skip file on a later resume
    assert [e.step for e in listed.pending] == [90]


def test_skip_list_matches_a_batch_with_nan_values_and_survives_json():
    import json

    from lightning_spikewatch.events import json_safe

    nan_batch = entry(40, (32.0, math.nan, math.nan))
    restored = SkipEntry.from_dict(json.loads(json.dumps(json_safe(nan_batch.to_dict()))))
    listed = SkipList()
    listed.add([restored])
    assert listed.match((32.0, math.nan, math.nan)).step == 40


def test_skip_list_keeps_only_its_own_rank_and_round_trips_its_state():
    listed = SkipList(rank=1)
    listed.add([entry(40, (1.0,), rank=0), entry(41, (2.0,), rank=1)])
    assert [e.step for e in listed.pending] == [41]
    listed.match((2.0,))
    listed.add([entry(50, (3.0,), rank=1)])
    again = SkipList(rank=1)
    again.load_state_dict(listed.state_dict())
    assert [e.step for e in again.pending] == [50] and again.consumed == {(41, 1)}
