"""engine(..., overrides=...): every planner decision can be fixed by the user, the rest is planned around it,
budgets still hold, bad overrides are refused before any work, and training equals plain PyTorch whatever
the placement."""
import copy

import pytest
import torch

import offload
from offload import plan as planmod
from offload.errors import BudgetError, ConfigError
from offload.groups import split_units
from offload.overrides import parse_overrides
from conftest import HP, assert_runs_match, param_count, run_reference, tier_kwargs, train_engine
from models import make_gpt, token_batches


def engine(model, tmp_path, mix="cpu+nvme", gpu_room=0, cpu_room=0, **kw):
    """The mix's budgets, with gpu_room (cpu_room) more bytes on the compute side (in host memory)."""
    budgets = tier_kwargs(model, mix, tmp_path)
    budgets["gpu_memory"] += gpu_room
    budgets["cpu_memory"] += cpu_room
    return offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32, **budgets, **kw)


def homes(eng):
    return {u.name: (u.params_home, u.states_home) for u in eng.plan.units}


def test_unit_homes_are_honoured_and_training_equals_torch(tmp_path):
    """Fixed homes on every tier, against what the planner chose alone; the weights and losses equal plain
    PyTorch either way (placement never changes the numbers)."""
    model, data = make_gpt(), token_batches(4)
    ref = run_reference(model, data)
    with engine(copy.deepcopy(model), tmp_path / "a") as eng:
        planned = homes(eng)
    names = list(planned)
    want = {names[1]: ("nvme", "nvme"), names[2]: ("cpu", "nvme"), names[-1]: ("gpu", "gpu"),
            names[3]: ("nvme", "cpu")}
    assert any(planned[n] != h for n, h in want.items())
    spec = {"units": {n: {"params": p, "states": s} for n, (p, s) in want.items()}}
    with engine(copy.deepcopy(model), tmp_path / "b", gpu_room=1 << 20, overrides=spec) as eng:
        got_homes = homes(eng)
        for n, h in want.items():
            assert got_homes[n] == h, (n, got_homes[n])
        assert eng.plan.bytes["nvme"] > 0 and eng.plan.bytes["gpu"] > 0
        got = train_engine(eng, data)
    assert_runs_match(got, ref, model)


def test_one_home_alone_leaves_the_other_to_the_planner(tmp_path):
    model = make_gpt()
    with engine(copy.deepcopy(model), tmp_path / "a") as eng:
        planned = homes(eng)
    name = list(planned)[2]
    with engine(model, tmp_path / "b", overrides={"units": {name: {"states": "nvme"}}}) as eng:
        assert homes(eng)[name] == (planned[name][0], "nvme")


def test_depths_and_queue_depth_reach_the_streamer_and_the_store(tmp_path):
    model = make_gpt()
    spec = {"prefetch_depth": 1, "disk_prefetch_depth": 7, "queue_depth": 5}
    with engine(model, tmp_path, mix="nvme", cpu_room=1 << 20, overrides=spec) as eng:   # room for 4 more slots
        assert (eng.plan.prefetch_depth, eng.plan.disk_prefetch_depth, eng.plan.queue_depth) == (1, 7, 5)
        assert eng.tiers.store.queue_depth == 5
        assert eng.plan.param_slots == 8      # a read-ahead of 7 units, and one slot kept for demand reads
        train_engine(eng, token_batches(2))   # the streamer prefetches with these depths


def test_a_deeper_disk_read_ahead_needs_its_staging_in_host_memory(tmp_path):
    model = make_gpt()
    with pytest.raises(BudgetError, match="short of the minimum for streaming from NVMe"):
        engine(model, tmp_path, mix="nvme", overrides={"disk_prefetch_depth": 7})


def test_a_deeper_prefetch_needs_its_buffers_on_the_device(tmp_path):
    """The planner's own depth falls back to 1 on a tight device; a fixed depth does not, and is refused
    with the numbers when its buffers do not fit."""
    model = make_gpt()
    units = split_units(model)
    tight = planmod.stream_working_set(units, 4, 1) + 1024
    with pytest.raises(BudgetError, match="prefetch_depth"):
        offload.engine(model, device="cpu", dtype=torch.float32, gpu_memory=tight, overrides={"prefetch_depth": 4})


def test_device_update_share_is_the_share_of_adamw_on_the_device():
    model = make_gpt()
    n = param_count(model)
    for share, sites in ((1.0, {"device"}), (0.0, {"host"})):
        with offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cpu",
                            dtype=torch.float32, gpu_memory=4 * n + (1 << 16),
                            overrides={"device_update_share": share}) as eng:
            assert {p.update_on for p in eng.plan.units if p.states_home == "cpu"} == sites
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        offload.engine(model, device="cpu", dtype=torch.float32, gpu_memory=4 * n + (1 << 16),
                       clip_grad_norm=1.0, overrides={"device_update_share": 0.5})


def test_activation_share_sets_the_device_reserve():
    """On CUDA the planner keeps ACTIVATION_SHARE of gpu_memory for activations; the override sets it (the
    placement itself is arithmetic, so this runs without a GPU)."""
    units = split_units(make_gpt())
    kw = dict(itemsize=2, device="cuda", gpu_budget=1 << 26, cpu_budget=None, nvme=None, grad_accum=1,
              activations="auto", rates=planmod.DEFAULT_RATES, eager=False)
    default = planmod.engine_placement(units, **kw)
    assert default.act_reserve == int((1 << 26) * planmod.ACTIVATION_SHARE)
    fixed = planmod.engine_placement(units, overrides=parse_overrides({"activation_share": 0.7},
                                                                      [u.name for u in units]), **kw)
    assert fixed.act_reserve == int((1 << 26) * 0.7)


def test_overrides_beyond_the_budgets_are_refused_with_numbers(tmp_path):
    model = make_gpt()
    names = [u.name for u in split_units(model)]
    everything_on_gpu = {"units": {n: {"params": "gpu", "states": "gpu"} for n in names}}
    kw = tier_kwargs(model, "cpu", tmp_path)
    with pytest.raises(BudgetError, match=r"overrides put on the device.*short; place fewer units on the gpu"):
        offload.engine(model, device="cpu", dtype=torch.float32, overrides=everything_on_gpu, **kw)
    all_in_ram = {"units": {n: {"params": "cpu", "states": "cpu"} for n in names}}
    with pytest.raises(BudgetError, match="short of what overrides keep in host memory"):
        offload.engine(model, device="cpu", dtype=torch.float32, overrides=all_in_ram,
                       **tier_kwargs(model, "nvme", tmp_path))
    with pytest.raises(ConfigError, match="no nvme paths"):
        offload.engine(model, device="cpu", dtype=torch.float32, overrides={"units": {names[1]: {"states": "nvme"}}},
                       **kw)


def test_forced_device_units_are_placed_before_the_planners_own(tmp_path):
    """A unit forced onto the device takes its room first, so a plan that fits is not refused because the
    planner had already filled the device with params of its own choosing."""
    model = make_gpt()
    units = split_units(model)
    names = [u.name for u in units]
    budgets = tier_kwargs(model, "cpu", tmp_path)    # the streaming working set and nothing more
    budgets["gpu_memory"] += 4 * units[-2].numel + planmod.device_state_bytes(units[-2].numel_train)
    spec = {"units": {names[-2]: {"params": "gpu", "states": "gpu"}}}
    with offload.engine(model, device="cpu", dtype=torch.float32, overrides=spec, **budgets) as eng:
        assert homes(eng)[names[-2]] == ("gpu", "gpu")
        assert eng.plan.bytes["gpu"] <= budgets["gpu_memory"]


def test_bad_overrides_name_every_problem():
    model = make_gpt()
    names = [u.name for u in split_units(model)]
    spec = {"prefetch": 2, "queue_depth": 0, "activation_share": 1.5, "device_update_share": -0.1,
            "units": {"blocks.99": {"params": "gpu"}, names[1]: {"params": "disk"},
                      names[2]: {"params": "cpu", "states": "gpu"}}}
    with pytest.raises(ConfigError) as e:
        offload.engine(model, device="cpu", overrides=spec)
    msg = str(e.value)
    for part in ("unknown key 'prefetch'", "queue_depth=0", "activation_share=1.5", "device_update_share=-0.1",
                 "no unit named 'blocks.99'", "'disk': one of gpu, cpu, nvme", "states on the gpu need the params"):
        assert part in msg, (part, msg)
    with pytest.raises(ConfigError, match="must be a dict"):
        offload.engine(model, device="cpu", overrides=[("prefetch_depth", 2)])
