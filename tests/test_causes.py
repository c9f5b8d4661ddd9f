"""Each attribution rule on hand-made evidence, and the ranking across rules."""

import math

from lightning_spikewatch.causes import (
    AdamLayer,
    LayerGradients,
    SampleLoss,
    SampleLosses,
    SpikeContext,
    rank_causes,
)
from lightning_spikewatch.events import Cause


def context(**kwargs) -> SpikeContext:
    base = dict(
        loss=3.0, loss_median=1.0, loss_z=10.0, loss_spread=0.2, z_threshold=6.0, batch_size=32, nominal_batch_size=32
    )
    base.update(kwargs)
    return SpikeContext(**base)


def top(ctx: SpikeContext) -> Cause:
    return rank_causes(ctx)[0].cause


def test_nothing_explains_it_so_it_is_minibatch_noise():
    ranked = rank_causes(context(class_counts={0: 20, 1: 12}))
    assert [c.cause for c in ranked] == [Cause.MINIBATCH_NOISE]
    assert ranked[0].evidence["class_counts"] == {0: 20, 1: 12}


def test_short_batch_names_both_sizes_and_the_remainder():
    ranked = rank_causes(context(batch_size=1, is_last_batch=True, dataset_size=993))
    assert ranked[0].cause is Cause.SHORT_BATCH
    assert ranked[0].evidence == {
        "batch_size": 1,
        "nominal_batch_size": 32,
        "which": "this batch",
        "last_batch": True,
        "dataset_size": 993,
        "dataset_remainder": 1,
    }


def test_a_barely_short_batch_is_not_blamed():
    assert top(context(batch_size=31)) is Cause.MINIBATCH_NOISE


def test_previous_short_batch_explains_a_spike_after_it():
    ranked = rank_causes(context(previous_batch_size=2))
    assert ranked[0].cause is Cause.SHORT_BATCH and ranked[0].evidence["which"] == "previous batch"


def samples(losses, indices=None, source="replay"):
    ordered = sorted(range(len(losses)), key=lambda i: -losses[i])
    top3 = [SampleLoss(i, losses[i], indices[i] if indices else None) for i in ordered[:3]]
    return SampleLosses(len(losses), sum(losses), top3, source)


def test_outlier_sample_names_the_dataset_index():
    # (a loss of 401 is beyond what -log(p) can reach in float32, so this is not log_zero)
    losses = [1.0] * 31 + [401.0]  # without the last sample the batch mean would be 1.0
    ctx = context(loss=sum(losses) / 32, samples=samples(losses, indices=list(range(100, 132))))
    ranked = rank_causes(ctx)
    assert ranked[0].cause is Cause.OUTLIER_SAMPLE
    assert ranked[0].evidence["samples"][0]["index"] == 131
    assert ranked[0].evidence["explained_fraction"] == 1.0


def test_evenly_spread_loss_is_not_an_outlier_sample():
    ranked = rank_causes(context(samples=samples([3.0] * 32)))
    assert Cause.OUTLIER_SAMPLE not in [c.cause for c in ranked]


def test_log_zero_outranks_outlier_sample_when_the_loss_is_minus_log_of_almost_zero():
    losses = [0.1] * 31 + [16.1]  # -log(1e-7)
    ctx = context(loss=sum(losses) / 32, loss_median=0.1, samples=samples(losses))
    ranked = rank_causes(ctx)
    assert [c.cause for c in ranked[:2]] == [Cause.LOG_ZERO, Cause.OUTLIER_SAMPLE]
    assert math.isclose(ranked[0].evidence["probability"], math.exp(-16.1))


def test_huge_regression_loss_is_not_log_zero():
    losses = [1.0] * 31 + [900.0]
    ctx = context(loss=sum(losses) / 32, samples=samples(losses))
    assert top(ctx) is Cause.OUTLIER_SAMPLE


def test_regression_batches_are_never_log_zero():
    losses = [0.1] * 31 + [16.1]
    ctx = context(loss=sum(losses) / 32, loss_median=0.1, samples=samples(losses), has_integer_targets=False)
    assert top(ctx) is Cause.OUTLIER_SAMPLE


def test_log_zero_from_the_batch_loss_alone():
    assert top(context(loss=18.4, loss_median=0.3)) is Cause.LOG_ZERO


def test_input_scale_needs_an_outlier_magnitude():
    ranked = rank_causes(context(input_rms=3e4, input_rms_median=3.0, input_rms_z=1e5, input_rms_sample=77))
    assert ranked[0].cause is Cause.INPUT_SCALE and ranked[0].evidence["sample"] == 77
    assert top(context(input_rms=3.5, input_rms_median=3.0, input_rms_z=2.0)) is Cause.MINIBATCH_NOISE


def test_adam_second_moment_names_the_layer_with_the_oversized_update():
    layers = [AdamLayer("net.0.weight", 0.15, 1.1, 0.01), AdamLayer("net.3.weight", 25.0, 1.4e4, 0.7)]
    ranked = rank_causes(context(adam=layers))
    assert ranked[0].cause is Cause.ADAM_SECOND_MOMENT
    assert ranked[0].evidence["layer"] == "net.3.weight" and ranked[0].evidence["update_ratio"] == 25.0


def test_healthy_adam_updates_explain_nothing():
    layers = [AdamLayer("a", 0.2, 1.0, 0.02), AdamLayer("b", 0.3, 2.0, 0.05)]
    assert top(context(adam=layers)) is Cause.MINIBATCH_NOISE


def test_layer_gradient_needs_one_layer_far_beyond_the_others():
    names = ["l0", "l1", "l2"]
    one = LayerGradients(names, current=[0.2, 0.1, 0.3], typical=[0.1, 0.1, 0.1], previous=[0.1, 50.0, 0.12])
    ranked = rank_causes(context(layers=one))
    assert ranked[0].cause is Cause.LAYER_GRADIENT
    assert ranked[0].evidence["layer"] == "l1" and ranked[0].evidence["which"] == "previous step"
    everywhere = LayerGradients(names, current=[5.0, 5.0, 5.0], typical=[0.1, 0.1, 0.1], previous=[0.1, 0.1, 0.1])
    assert top(context(layers=everywhere)) is Cause.MINIBATCH_NOISE


def test_learning_rate_jump_just_before_the_spike():
    ranked = rank_causes(context(lr_history=[[1e-3, 1e-3, 1e-3, 0.1, 0.1]]))
    assert ranked[0].cause is Cause.LEARNING_RATE
    assert ranked[0].evidence["lr_before"] == 1e-3 and ranked[0].evidence["steps_before"] == 1


def test_smooth_warmup_is_not_a_learning_rate_jump():
    ramp = [[1e-4 * (i + 10) for i in range(9)]]
    assert top(context(lr_history=ramp)) is Cause.MINIBATCH_NOISE


def test_non_finite_always_wins():
    ranked = rank_causes(context(loss=math.nan, non_finite=["loss", "grad_norm"], batch_size=1))
    assert ranked[0].cause is Cause.NON_FINITE and ranked[0].score == 1.0
