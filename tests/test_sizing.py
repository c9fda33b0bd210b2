"""Elastic pool sizing (engine/core/sizing.py): the plan's arithmetic and the resize decisions."""

from __future__ import annotations

import pytest

from engine.config import ClusterConfig
from engine.core.scheduler import ChainScheduler
from engine.core.sizing import (
    Backlog,
    NoGPUError,
    Resources,
    SlotState,
    check_gpus,
    initial_max_preparing,
    plan_pools,
    queue_backlog,
    resize,
)

AUTO = {"samplers": "auto", "trainers": "auto", "backgrounds": "auto", "refiners": "auto",
        "max_preparing": "auto", "sampler_gpus": 1.0, "trainer_gpus": 1.0,
        "background_gpus": 1.0}  # fmt: skip


def auto(**kw: object) -> ClusterConfig:
    return ClusterConfig.model_validate({**AUTO, **kw})


def gpus_of(counts: dict[str, int], c: ClusterConfig) -> float:
    return (counts["samplers"] * c.sampler_gpus + counts["trainers"] * c.trainer_gpus
            + counts["backgrounds"] * c.background_gpus)  # fmt: skip


def test_fresh_queue_gives_the_gpus_to_preparation_in_proportion_to_stage_time():
    c = auto()
    plan = plan_pools(Backlog(queued=500), Resources(gpus=64), c)
    n = plan.counts
    assert n["samplers"] == c.min_samplers == 1  # nothing to render yet
    assert gpus_of(n, c) == 64  # every GPU has a use
    # 60 s of training : 15 s of plate -> 4 : 1 of the 63 left (max_prepare_workers 64)
    assert n["trainers"] == 51 and n["backgrounds"] == 12
    assert plan.max_preparing == 126  # one in work + one waiting per prepare worker
    assert n["refiners"] == 4
    # the queue wants 1 + 64 GPUs; the cluster has 64
    assert plan.wanted_gpus == 65 and len(plan.bundles) == 65


def test_ready_renders_take_samplers_first_and_preparation_keeps_a_share():
    c = auto()
    plan = plan_pools(Backlog(queued=100, preparing=40, rendering=480), Resources(gpus=64), c)
    # 480 ready renders fill 60 batches of 8; 62 would fit, 2 GPUs stay with preparation
    assert plan.counts["samplers"] == 60
    assert plan.counts["trainers"] + plan.counts["backgrounds"] == 4
    assert plan.counts["trainers"] >= 1 and plan.counts["backgrounds"] >= 1
    # without any render left to prepare every GPU samples (one Sampler per GPU)
    plan = plan_pools(Backlog(rendering=480), Resources(gpus=64), c)
    assert plan.counts == {"samplers": 64, "trainers": 0, "backgrounds": 0, "refiners": 1}
    assert plan.max_preparing == 1  # nothing to prepare


def test_samplers_are_capped_and_measured_stage_times_move_the_split():
    c = auto(max_samplers=16)
    plan = plan_pools(Backlog(rendering=1000), Resources(gpus=64), c)
    assert plan.counts["samplers"] == 16
    plan = plan_pools(Backlog(queued=500), Resources(gpus=21), auto(),
                      {"training": 30.0, "background": 30.0})  # fmt: skip
    assert plan.counts["trainers"] == plan.counts["backgrounds"] == 10


def test_fractions_pack_actors_on_one_gpu_and_an_idle_cluster_keeps_min_samplers():
    c = auto(sampler_gpus=0.5, trainer_gpus=0.25, background_gpus=0.25)
    plan = plan_pools(Backlog(queued=3), Resources(gpus=1), c)
    # one of each fits on one GPU: 0.5 + 0.25 + 0.25
    assert (plan.counts["samplers"], plan.counts["trainers"], plan.counts["backgrounds"]) == (
        1, 1, 1)  # fmt: skip
    assert gpus_of(plan.counts, c) == pytest.approx(1.0)
    idle = plan_pools(Backlog(), Resources(gpus=8), auto(min_samplers=0))
    assert idle.counts["samplers"] == 0 and idle.wanted_gpus == 0


def test_fixed_counts_are_kept():
    c = ClusterConfig(samplers=3, trainers=2, backgrounds=1, max_preparing=5)
    plan = plan_pools(Backlog(queued=500, rendering=100), Resources(gpus=64), c)
    assert plan.counts == {"samplers": 3, "trainers": 2, "backgrounds": 1, "refiners": 1}
    assert plan.max_preparing == 5
    assert initial_max_preparing(c) == 5
    assert initial_max_preparing(auto()) == 2
    assert initial_max_preparing(ClusterConfig(trainers=3, backgrounds=2,
                                               max_preparing="auto")) == 10  # fmt: skip


def test_queue_backlog_counts_the_scheduler_stages():
    s = ChainScheduler(max_batch=2, max_preparing=2)
    for i in range(5):
        s.add(f"r{i}", frames_total=3, signature="x")
    first, second = s.next_prepares()
    s.prepared(first)
    s.cancel("r4")
    assert queue_backlog(s) == Backlog(queued=2, preparing=1, rendering=1)
    assert second == "r1"


def _slot(slot: int, load: int = 0, ready: bool = True, started: float = 0.0,
          idle_since: float | None = 0.0) -> SlotState:  # fmt: skip
    return SlotState(slot, load, ready, started, None if load else idle_since)


def test_resize_grows_within_free_gpus_samplers_first():
    c = auto()
    plan = plan_pools(Backlog(queued=10, rendering=40), Resources(gpus=8), c)
    assert plan.counts["samplers"] == 5
    pools = {"samplers": [_slot(0, load=1)], "trainers": [_slot(0, load=1)]}
    out = resize(plan, pools, c, gpus=8, now=10.0)
    assert out.start["samplers"] == 4  # 5 wanted, 1 there
    assert out.start["trainers"] + out.start["backgrounds"] == 2  # what the 8 GPUs leave
    assert not any(out.stop.values())


def test_resize_releases_idle_samplers_only_after_sampler_idle_s():
    c = auto(sampler_idle_s=120.0)
    plan = plan_pools(Backlog(), Resources(gpus=4), c)  # nothing left: min_samplers = 1
    pools = {"samplers": [_slot(0, idle_since=0.0), _slot(1, idle_since=50.0),
                          _slot(2, load=1), _slot(3, idle_since=100.0)]}  # fmt: skip
    assert resize(plan, pools, c, gpus=4, now=119.0).stop["samplers"] == []
    assert resize(plan, pools, c, gpus=4, now=170.0).stop["samplers"] == [0, 1]
    # the busy one is never released; one stays (min_samplers)
    assert resize(plan, pools, c, gpus=4, now=1000.0).stop["samplers"] == [0, 1, 3]


def test_resize_drains_busy_prepare_workers_over_the_plan():
    c = auto()
    plan = plan_pools(Backlog(rendering=64), Resources(gpus=4), c)
    assert plan.counts["trainers"] == 0
    pools = {"trainers": [_slot(0, load=1, started=0.0), _slot(1, idle_since=5.0),
                          _slot(2, load=2, started=3.0)]}  # fmt: skip
    out = resize(plan, pools, c, gpus=4, now=10.0)
    assert out.stop["trainers"] == [1]  # idle: released at once
    assert out.drain["trainers"] == {0, 2}  # busy: no new work, released once idle
    assert out.start["samplers"] == 2  # 4 wanted; the 2 GPUs the draining ones hold are not free


def test_resize_gives_up_on_actors_that_never_got_a_gpu():
    c = auto(gpu_wait_s=60.0)
    plan = plan_pools(Backlog(rendering=64), Resources(gpus=8), c)
    pools = {
        "samplers": [_slot(i) for i in range(6)]
        + [_slot(6, ready=False, started=0.0), _slot(7, ready=False, started=30.0)]
    }
    assert resize(plan, pools, c, gpus=8, now=59.0).stop["samplers"] == []
    out = resize(plan, pools, c, gpus=8, now=61.0)
    assert out.stop["samplers"] == [6]
    assert out.start["samplers"] == 1  # planned again in its place


def test_no_gpu_fails_with_the_fix():
    check_gpus(ClusterConfig(), 0.0)  # CPU-only actors: fine
    check_gpus(auto(), 1.0)
    with pytest.raises(NoGPUError, match=r"no GPU.*cluster\.sampler_gpus=1.*sampler_gpus=0"):
        check_gpus(auto(trainer_gpus=0.0, background_gpus=0.0), 0.0)


def test_shared_models_plan_one_device_worker_per_gpu_for_rendering_and_preparing():
    # sd15's shares: 0.5 + 0.25 + 0.25 → one DeviceWorker holds one whole GPU
    c = auto(shared_models=True, sampler_gpus=0.5, trainer_gpus=0.25, background_gpus=0.25)
    fresh = plan_pools(Backlog(queued=500), Resources(gpus=64), c)
    assert fresh.counts["samplers"] == 64  # the devices do the preparing: every GPU has a use
    assert fresh.counts["trainers"] == fresh.counts["backgrounds"] == 0  # no pools of their own
    assert fresh.max_preparing == 64  # one render per worker
    assert (
        fresh.wanted_gpus == 64 and fresh.bundles == [{"GPU": 1.0}] * 64
    )  # capped by max_prepare_workers
    small = plan_pools(Backlog(rendering=16, preparing=2), Resources(gpus=8), c)
    assert (
        small.counts["samplers"] == 8
    )  # 2 batches + 2 prepares wanted, free GPUs join while work is left
    assert small.wanted_gpus == 4
    idle = plan_pools(Backlog(), Resources(gpus=8), c)
    assert idle.counts["samplers"] == c.min_samplers == 1
    grow = plan_pools(Backlog(rendering=80), Resources(gpus=2), c)
    assert grow.counts["samplers"] == 2 and grow.wanted_gpus == 10  # the autoscaler is asked for 10
    fixed = plan_pools(Backlog(queued=50), Resources(gpus=8), auto(shared_models=True, samplers=3))
    assert fixed.counts["samplers"] == 3 and fixed.max_preparing == 3
