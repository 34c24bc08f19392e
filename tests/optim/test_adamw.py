"""fmcore.optim.FusedAdamW and its ops against torch.optim.AdamW, on CPU always and CUDA when present.

"Relative difference" below is max|ours - torch| / max|torch| over a tensor: the issue's bar is 1e-6
for fp32 params after 100 steps, i.e. a few fp32 ulps of the largest param.
"""

import copy

import pytest
import torch

import fmcore  # noqa: F401  (registers the ops)
from fmcore.ops import grad_norm
from fmcore.optim import FusedAdamW
from tests.util import cpu_threads

# Param shapes, and why each is here.
SHAPES = [
    (37, 5),  # 185 elements: not a multiple of the 4-element vector, so the scalar tail runs
    (70001,),  # nine update chunks (8192 elements each) and five norm chunks (16384), ragged last chunk
    (1,),  # a single element
    (0,),  # zero elements: step still counts, nothing else happens
    (4, 8, 16),  # 3-d, vector-aligned
]


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    # The tensors here are small: with several threads on a busy 2-core machine, OpenMP's spinning
    # makes torch's own CPU AdamW (the reference) 50x slower.
    with cpu_threads(1):
        yield


def norm64(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in tensors]))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_params(device, shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def random_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def run_pair(ours, ref, ours_params, ref_params, steps, clip=None, scale=1.0):
    for s in range(steps):
        grads = random_grads(ours_params, s, scale)
        set_grads(ours_params, grads)
        set_grads(ref_params, grads)
        ours.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
        ref.step()


def assert_params_match(ours_params, ref_params, bound=1e-6):
    for i, (p, q) in enumerate(zip(ours_params, ref_params)):
        assert p.shape == q.shape
        d = rel_diff(p, q)
        assert d < bound, f"param {i} {tuple(p.shape)}: relative difference {d:.3g} >= {bound}"


def test_100_steps_match_torch_adamw(device):
    ours_p = make_params(device)
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1)
    run_pair(ours, ref, ours_p, ref_p, 100)
    assert_params_match(ours_p, ref_p)
    for p, q in zip(ours_p, ref_p):
        so, sr = ours.state[p], ref.state[q]
        assert so["step"].item() == sr["step"].item() == 100
        assert rel_diff(so["exp_avg"], sr["exp_avg"]) < 1e-6
        assert rel_diff(so["exp_avg_sq"], sr["exp_avg_sq"]) < 1e-6
    assert ours.last_grad_norm is None  # no clipping, no skip: the norm pass does not run


@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clipping", "below-threshold"])
def test_clipping_matches_clip_grad_norm(device, max_norm):
    ours_p = make_params(device)
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=max_norm)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    for s in range(30):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(ref_p, grads)
        ours.step()
        total = torch.nn.utils.clip_grad_norm_(ref_p, max_norm)
        ref.step()
        assert rel_diff(ours.last_grad_norm, norm64(grads)) < 1e-6
        assert rel_diff(ours.last_grad_norm, total) < 1e-5  # torch's fp32 norm has its own error
    assert_params_match(ours_p, ref_p)
    # The clip is applied in registers: p.grad keeps the unclipped gradient.
    assert torch.equal(ours_p[0].grad, random_grads(ours_p, 29)[0])


def test_param_groups_with_own_hyperparameters(device):
    ours_p = make_params(device)
    ref_p = clone_params(ours_p)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0},
            {"params": ps[2:4], "eps": 1e-6},
            {"params": ps[4:], "lr": 2e-2, "betas": (0.3, 0.9), "weight_decay": 0.5},  # beta1 < 0.5: lerp's other branch
        ]

    ours = FusedAdamW(groups(ours_p), lr=1e-2)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-2)
    run_pair(ours, ref, ours_p, ref_p, 20)
    assert_params_match(ours_p, ref_p)


def test_params_without_grad_are_skipped(device):
    ours_p = make_params(device)
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=1.0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    frozen = ours_p[0].detach().clone()
    for s in range(5):
        grads = random_grads(ours_p, s)
        for ps in (ours_p, ref_p):
            set_grads(ps[1:], grads[1:])
            ps[0].grad = None
        ours.step()
        torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
        ref.step()
    assert torch.equal(ours_p[0].detach(), frozen)
    assert len(ours.state[ours_p[0]]) == 0
    assert_params_match(ours_p, ref_p)
    # No param has a grad: the step is a no-op.
    for p in ours_p:
        p.grad = None
    before = [p.detach().clone() for p in ours_p]
    ours.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours_p))


def test_zero_element_params_count_steps(device):
    ours_p = make_params(device, shapes=[(0,), (0, 3), (5,)])
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, max_grad_norm=1.0)
    ref = torch.optim.AdamW(ref_p)
    run_pair(ours, ref, ours_p, ref_p, 3, clip=1.0)
    for p, q in zip(ours_p, ref_p):
        assert ours.state[p]["step"].item() == ref.state[q]["step"].item() == 3
        assert ours.state[p]["exp_avg"].shape == p.shape
    assert_params_match(ours_p, ref_p)
    only_empty = make_params(device, shapes=[(0,)])
    opt = FusedAdamW(only_empty, max_grad_norm=1.0)
    only_empty[0].grad = torch.zeros(0, device=device)
    opt.step()
    assert opt.last_grad_norm.item() == 0.0 and opt.state[only_empty[0]]["step"].item() == 1


def test_ten_thousand_tiny_tensors(device):
    # Many launches' worth of table entries (448 per update launch, 1024 per norm launch). Every
    # tensor has one element, so torch's AdamW on one flat tensor is the same elementwise math.
    n = 10_000
    flat = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(device)
    ours_p = [flat[i : i + 1].clone().requires_grad_() for i in range(n)]
    ref_p = flat.clone().requires_grad_()
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=2.0)
    ref = torch.optim.AdamW([ref_p], lr=1e-2)
    for s in range(3):
        g = torch.randn(n, generator=torch.Generator().manual_seed(s)).to(device)
        for i, p in enumerate(ours_p):
            p.grad = g[i : i + 1].clone()
        ref_p.grad = g.clone()
        ours.step()
        torch.nn.utils.clip_grad_norm_([ref_p], 2.0)
        ref.step()
        assert rel_diff(ours.last_grad_norm, norm64([g])) < 1e-6
    assert rel_diff(torch.cat([p.detach() for p in ours_p]), ref_p) < 1e-6


def test_empty_and_ragged_tensors_across_table_boundaries(device):
    # 900 tensors: two update launches (448 a table) and the start of a third. Zero-size tensors sit
    # in the middle, at the last slot of the first table (447), the first of the second (448) and
    # the last of the whole list; multi-chunk tensors straddle the table boundary (446, 449).
    sizes = [(i * 7) % 13 for i in range(900)]
    sizes[446], sizes[449], sizes[450] = 8192 * 2 + 5, 8193, 16385
    for i in (10, 11, 447, 448, 895, 899):
        sizes[i] = 0
    ours_p = make_params(device, [(n,) for n in sizes])
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=3.0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    run_pair(ours, ref, ours_p, ref_p, 3, clip=3.0)
    assert_params_match(ours_p, ref_p)
    assert all(ours.state[p]["step"].item() == 3 for p in ours_p)


def test_more_than_2_31_elements_on_meta():
    # The optimizer's Python path and the ops' fake implementations take a 2^31 + 5 element param
    # without allocating it (meta tensors have no storage). The kernels index with int64; the real
    # run of such a tensor is test_more_than_2_31_elements_cuda.
    n = 2**31 + 5
    p = torch.empty(n, device="meta", dtype=torch.bfloat16, requires_grad=True)
    opt = FusedAdamW([p], max_grad_norm=1.0, master_weights=True, skip_nonfinite=True)
    p.grad = torch.empty(n, device="meta", dtype=torch.bfloat16)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].numel() == n and state["master_param"].dtype == torch.float32
    assert opt.last_grad_norm.device.type == "meta"


def test_params_added_after_an_empty_first_group_get_the_norm_on_their_device():
    # The norm and skip counter are made in the constructor, on the first param's device: with none
    # yet they were on the CPU, and CUDA params added later failed their first step. Meta stands in
    # for CUDA here (any device other than the CPU).
    opt = FusedAdamW([{"params": []}], max_grad_norm=1.0, skip_nonfinite=True)
    p = torch.zeros(5, device="meta", requires_grad=True)
    opt.add_param_group({"params": [p]})
    assert opt.last_grad_norm.device.type == opt.skipped_steps.device.type == "meta"
    p.grad = torch.zeros(5, device="meta")
    opt.step()  # was: ValueError: expected all tensors on one device, got tensors on meta and norm on cpu


@pytest.mark.cuda
@pytest.mark.bigmem
def test_more_than_2_31_elements_cuda():
    # bf16 param + fp32 master: 2 + 2 + 4 * 3 = 16 bytes an element, 34 GB in all.
    n = 2**31 + 1001
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with 48 GiB")
    dev = torch.device("cuda")
    try:
        p = torch.randn(n, device=dev, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.randn(n, device=dev, dtype=torch.bfloat16)
        opt = FusedAdamW([p], lr=1e-2, max_grad_norm=1000.0, master_weights=True)
        head, tail = slice(0, 4096), slice(n - 4096, n)
        before = {k: p.detach()[s].float().clone() for k, s in (("head", head), ("tail", tail))}
        grads = {k: p.grad[s].float().clone() for k, s in (("head", head), ("tail", tail))}
        opt.step()
        torch.cuda.synchronize()
        norm_ref = torch.linalg.vector_norm(p.grad.float()).item()  # a 2^31-element float copy: 8.6 GB more
        assert abs(opt.last_grad_norm.item() - norm_ref) / norm_ref < 1e-5
        clip = min(1.0, 1000.0 / (opt.last_grad_norm.item() + 1e-6))
        master = opt.state[p]["master_param"]
        for k, s in (("head", head), ("tail", tail)):
            q = before[k].clone().requires_grad_()
            q.grad = grads[k] * clip
            torch.optim.AdamW([q], lr=1e-2).step()
            assert rel_diff(master[s], q) < 1e-6, k
            assert torch.equal(p.detach()[s], master[s].to(torch.bfloat16)), k
    finally:
        p = opt = master = None
        torch.cuda.empty_cache()


@pytest.mark.parametrize("shapes", [
    [(37, 5), (70001,), (1,)],
    # A zero-size tensor's master copy has a null data pointer. The CUDA launcher once decided
    # "master weights or not" from the first tensor's pointer: with an empty first param it updated
    # the bf16/fp16 params in place and never touched their master copies.
    [(0,), (37, 5), (70001,)],
], ids=["shapes", "zero-size-first"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_track_fp32_reference(device, dtype, shapes):
    # The fp32 reference starts from the low-precision params and sees the same (rounded) grads;
    # the master copy then follows it to fp32 accuracy and the param is the master rounded.
    ours_p = make_params(device, shapes, dtype=dtype)
    ref_p = clone_params(ours_p, torch.float32)
    ours = FusedAdamW(ours_p, lr=1e-2, master_weights=True, max_grad_norm=5.0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    for s in range(20):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(ref_p, [g.float() for g in grads])
        ours.step()
        torch.nn.utils.clip_grad_norm_(ref_p, 5.0)
        ref.step()
    for p, q in zip(ours_p, ref_p):
        master = ours.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert rel_diff(master, q) < 1e-6
        assert torch.equal(p.detach(), master.to(dtype))
    # Without master weights the bf16 param itself is updated (lossy, but fp32 state).
    lowp = make_params(device, [(64,)], dtype=dtype)
    opt = FusedAdamW(lowp, lr=1e-2)
    lowp[0].grad = torch.ones_like(lowp[0])
    before = lowp[0].detach().clone()
    opt.step()
    assert "master_param" not in opt.state[lowp[0]] and opt.state[lowp[0]]["exp_avg"].dtype == torch.float32
    assert (lowp[0].detach().float() < before.float()).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_skip_nonfinite(device, bad):
    ours_p = make_params(device, dtype=torch.bfloat16)
    ours = FusedAdamW(ours_p, lr=1e-2, skip_nonfinite=True, master_weights=True)
    set_grads(ours_p, random_grads(ours_p, 0))
    ours.step()
    snapshot = [(p.detach().clone(), {k: v.clone() for k, v in ours.state[p].items()}) for p in ours_p]
    grads = random_grads(ours_p, 1)
    grads[1][123] = bad
    set_grads(ours_p, grads)
    ours.step()
    assert ours.skipped_steps.item() == 1
    assert not torch.isfinite(ours.last_grad_norm)
    for p, (value, state) in zip(ours_p, snapshot):
        assert torch.equal(p.detach(), value)
        for k, v in state.items():
            assert torch.equal(ours.state[p][k], v), k
    set_grads(ours_p, random_grads(ours_p, 2))
    ours.step()  # finite again: the step proceeds and counts
    assert ours.skipped_steps.item() == 1 and ours.state[ours_p[0]]["step"].item() == 2
    assert not torch.equal(ours_p[0].detach(), snapshot[0][0])


def test_clip_with_nan_norm_matches_clip_grad_norm(device):
    # Without skip_nonfinite, a NaN gradient makes the norm NaN and torch's clip factor
    # clamp(max_norm / (nan + 1e-6), max=1) NaN: every param becomes NaN. fminf(1, nan) = 1 once
    # applied the finite gradients unclipped instead.
    ours_p = make_params(device)
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=1.0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    grads = random_grads(ours_p, 0)
    grads[1][5] = float("nan")
    set_grads(ours_p, grads)
    set_grads(ref_p, grads)
    ours.step()
    torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
    ref.step()
    assert torch.isnan(ours.last_grad_norm)
    for p, q in zip(ours_p, ref_p):
        assert q.isnan().all()  # what torch does, which the comparison below pins
        torch.testing.assert_close(p, q, equal_nan=True)


def test_lr_as_tensor(device):
    lr = 0.0078125  # exactly representable in fp32: the tensor and the float give the same steps
    a_p = make_params(device)
    b_p = clone_params(a_p)
    lr_t = torch.tensor(lr, device=device)
    a = FusedAdamW(a_p, lr=lr, max_grad_norm=1.0)
    b = FusedAdamW(b_p, lr=lr_t, max_grad_norm=1.0)
    for s in range(5):
        if s == 3:  # a schedule writes into the tensor; the float group is updated the usual way
            lr_t.fill_(lr / 2)
            a.param_groups[0]["lr"] = lr / 2
        grads = random_grads(a_p, s)
        set_grads(a_p, grads)
        set_grads(b_p, grads)
        a.step()
        b.step()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p, q)


def test_state_dict_round_trips(device):
    shapes = [(37, 5), (70001,), (0,)]
    # ours -> torch: 5 steps of FusedAdamW, then both continue for 5 more from that checkpoint.
    ours_p = make_params(device, shapes)
    ours = FusedAdamW(ours_p, lr=1e-2)
    run_pair(ours, torch.optim.AdamW(clone_params(ours_p)), ours_p, clone_params(ours_p), 5)
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert {"lr", "betas", "eps", "weight_decay", "params"} <= set(sd["param_groups"][0])
    torch_p = clone_params(ours_p)
    to_torch = torch.optim.AdamW(torch_p, lr=1e-2)
    # A deep copy, as a checkpoint on disk would be: state_dict() returns the live state tensors and
    # torch's loader keeps them when no cast is needed, so both optimizers would share them.
    to_torch.load_state_dict(copy.deepcopy(sd))
    run_pair(ours, to_torch, ours_p, torch_p, 5)
    assert_params_match(ours_p, torch_p)
    # torch -> ours
    torch_p = make_params(device, shapes, seed=1)
    ref = torch.optim.AdamW(torch_p, lr=1e-2)
    run_pair(ref, torch.optim.AdamW(clone_params(torch_p)), torch_p, clone_params(torch_p), 5)
    ours_p = clone_params(torch_p)
    from_torch = FusedAdamW(ours_p, lr=1e-2)
    from_torch.load_state_dict(ref.state_dict())
    assert from_torch.state[ours_p[0]]["step"].device == ours_p[0].device
    run_pair(from_torch, ref, ours_p, torch_p, 5)
    assert_params_match(ours_p, torch_p)


def test_state_dict_keeps_fp32_state_and_master(device):
    ps = make_params(device, [(37, 5), (9,)], dtype=torch.bfloat16)
    opt = FusedAdamW(ps, lr=1e-2, master_weights=True)
    run_pair(opt, FusedAdamW(clone_params(ps)), ps, clone_params(ps), 3)
    sd = opt.state_dict()
    qs = clone_params(ps)
    loaded = FusedAdamW(qs, lr=1e-2, master_weights=True)
    loaded.load_state_dict(sd)
    for p, q in zip(ps, qs):
        for k in ("exp_avg", "exp_avg_sq", "master_param"):
            assert loaded.state[q][k].dtype == torch.float32
            assert torch.equal(loaded.state[q][k], opt.state[p][k]), k
            assert loaded.state[q][k].data_ptr() != opt.state[p][k].data_ptr()  # a copy, not an alias
    # A torch checkpoint of bf16 params (bf16 state, no master) loads with fp32 state; the master
    # copy is made from the param at the next step (test_torch_checkpoint_then_the_weights).
    tp = clone_params(ps)
    torch_opt = torch.optim.AdamW(tp, lr=1e-2)
    set_grads(tp, random_grads(tp, 0))
    torch_opt.step()
    rp = clone_params(tp)
    ours = FusedAdamW(rp, lr=1e-2, master_weights=True)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.state[rp[0]]["exp_avg"].dtype == torch.float32 and "master_param" not in ours.state[rp[0]]


@pytest.mark.parametrize("order", ["weights first", "optimizer state first"])
def test_torch_checkpoint_then_the_weights(order):
    # A torch.optim.AdamW checkpoint has no master copies. Made at load time from the param, they
    # held the fresh model's weights when the optimizer state was loaded first: the next step
    # resumed from those, undoing the weights loaded after.
    saved = make_params("cpu", [(37, 5), (9,)], dtype=torch.bfloat16)
    torch_opt = torch.optim.AdamW(saved, lr=1e-2)
    _two_steps(torch_opt, saved)
    sd = copy.deepcopy(torch_opt.state_dict())
    fresh = make_params("cpu", [(37, 5), (9,)], dtype=torch.bfloat16, seed=5)
    ours = FusedAdamW(fresh, lr=1e-2, master_weights=True)
    with torch.no_grad():
        if order != "weights first":
            ours.load_state_dict(sd)
        for p, q in zip(fresh, saved):
            p.copy_(q)  # model.load_state_dict
        if order == "weights first":
            ours.load_state_dict(sd)
    ref_p = clone_params(saved)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    ref.load_state_dict(sd)
    for opt, ps in ((ours, fresh), (ref, ref_p)):
        set_grads(ps, random_grads(ps, 9))
        opt.step()
    for p, q in zip(fresh, ref_p):
        d = rel_diff(p, q)  # a bf16 ulp or so: ours updates an fp32 master, torch the bf16 param
        assert d < 2 ** -7, f"relative difference {d:.3g} from torch.optim.AdamW resumed from the same checkpoint"


def test_grad_norm_op(device):
    tensors = [
        torch.randn(1000, device=device),
        torch.randn(70001, device=device, dtype=torch.bfloat16),
        torch.randn(37, 5, device=device, dtype=torch.float16),
        torch.randn(0, device=device),
        torch.randn(4097, device=device)[1:],  # a view 4 bytes off alignment: the scalar loop
    ]
    norm = grad_norm(tensors)
    ref = norm64(tensors)
    assert norm.shape == () and norm.dtype == torch.float32
    assert rel_diff(norm, ref) < 1e-6
    assert torch.equal(grad_norm(tensors), norm)  # deterministic
    count = torch.zeros((), dtype=torch.int64, device=device)
    grad_norm(tensors, out=norm, nonfinite_count=count)
    assert count.item() == 0
    tensors[2][3, 4] = float("inf")
    grad_norm(tensors, out=norm, nonfinite_count=count)
    assert count.item() == 1 and norm.item() == float("inf")
    # one tensor alone, as torch.nn.utils.get_total_norm takes it; no tensors, into an out tensor: 0
    assert torch.equal(grad_norm(tensors[0]), grad_norm(tensors[:1]))
    assert grad_norm([], out=norm).item() == 0.0
    with pytest.raises(TypeError, match="expected tensors to be an iterable of Tensors, got int"):
        grad_norm(5)
    with pytest.raises(ValueError, match=r"expected at least one tensor \(or an out tensor\) for grad_norm"):
        grad_norm([])


def test_unaligned_views_take_the_scalar_path(device):
    # Params carved from a flat buffer at odd offsets (as FSDP's flat params are): no 16-byte
    # alignment, so the kernels' per-tensor scalar loop runs.
    flat = torch.randn(3 + 185 + 70001, device=device)
    views = [flat[3:188].view(37, 5), flat[188:]]
    ours_p = [torch.nn.Parameter(v) for v in views]
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=1.0)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    run_pair(ours, ref, ours_p, ref_p, 10, clip=1.0)
    assert_params_match(ours_p, ref_p)


def test_errors(device):
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        FusedAdamW([torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)])
    with pytest.raises(ValueError, match="contiguous params"):
        FusedAdamW([torch.zeros(4, 6, device=device).t().requires_grad_()])
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW(make_params(device), betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedAdamW(make_params(device), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="one-element tensor, got shape \\(2,\\)"):
        FusedAdamW(make_params(device), lr=torch.tensor([1e-3, 1e-3]))
    other = "meta" if device.type == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match="one device"):
        FusedAdamW([torch.zeros(3, device=device, requires_grad=True), torch.zeros(3, device=other, requires_grad=True)])
    emb = torch.nn.Embedding(10, 4, sparse=True).to(device)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        FusedAdamW(emb.parameters()).step()
    opt = FusedAdamW(make_params(device))
    with pytest.raises(RuntimeError, match="one device"):
        opt.add_param_group({"params": [torch.zeros(3, device=other, requires_grad=True)]})
    assert len(opt.param_groups) == 1  # the rejected group is not kept
    sd = torch.optim.AdamW(make_params(device), amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW(make_params(device)).load_state_dict(sd)



@pytest.mark.parametrize("opt_class", [torch.optim.AdamW, FusedAdamW], ids=["torch", "fmcore"])
def test_step_before_the_backward_that_needs_the_params_raises(device, opt_class):
    """The step bumps the parameters' version counters, as torch's in-place updates do: a backward
    that saved them before the step raises instead of using the updated values."""
    w = torch.randn(4, 4, device=device, requires_grad=True)
    opt = opt_class([w])
    x = torch.randn(3, 4, device=device, requires_grad=True)
    loss = (x @ w).square().sum()  # saves w for x's gradient
    w.grad = torch.randn_like(w)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

def test_duplicate_param_in_a_group_raises(device):
    # torch.optim only warns about a param listed twice in a group; in FusedAdamW's launch table it
    # would be updated by two blocks at once (and its step bumped by two threads): a data race.
    p = torch.zeros(5, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="same param twice"):
        FusedAdamW([p, torch.zeros(3, device=device, requires_grad=True), p])
    opt = FusedAdamW([torch.zeros(3, device=device, requires_grad=True)])
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match=r"group 1 \(params 0 and 1\)"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def _op_args(device, n=2, dtype=torch.float32, master=False):
    params = [torch.randn(5 + i, device=device, dtype=dtype) for i in range(n)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.zeros(p.shape, device=device) for p in params]
    exp_avg_sqs = [torch.zeros(p.shape, device=device) for p in params]
    masters = [p.float() for p in params] if master else []
    steps = [torch.zeros((), device=device) for _ in params]
    norm = torch.ones((), device=device)
    return [params, grads, exp_avgs, exp_avg_sqs, masters, steps, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, norm, 1.0, True]


def test_op_argument_errors_name_the_argument(device):
    args = _op_args(device)
    args[2] = args[2][:1]
    with pytest.raises(ValueError, match="exp_avgs to hold one tensor per param"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[3][1] = args[3][1].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] to be float32"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[1][0] = torch.randn(7, device=device)
    with pytest.raises(ValueError, match=r"grads\[0\] of shape \(5,\)"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[0][1] = torch.randn(12, device=device)[::2]
    args[1][1] = torch.randn(6, device=device)
    args[2][1], args[3][1] = torch.zeros(6, device=device), torch.zeros(6, device=device)
    with pytest.raises(ValueError, match=r"params\[1\] to be contiguous"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[4] = [p.float() for p in args[0]]
    with pytest.raises(ValueError, match="master_params"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[12] = None
    with pytest.raises(ValueError, match="expected grad_norm"):
        torch.ops.fmcore.adamw_step_(*args)
    with pytest.raises(ValueError, match=r"tensors\[1\] to be float32"):
        grad_norm([torch.ones(3, device=device), torch.ones(3, device=device, dtype=torch.int32)])


def test_op_refuses_tensors_it_would_update_twice(device):
    # One step tensor for every param (apex FusedAdam's per-group step) was bumped by several CUDA threads
    # at once, losing updates (the CPU counted them all); a param listed twice, by two blocks at once.
    args = _op_args(device)
    args[5] = [args[5][0]] * 2
    with pytest.raises(ValueError, match=r"not to share memory, got steps\[0\] and steps\[1\]"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    args[0][1], args[1][1] = args[0][0], args[1][0]
    args[2][1], args[3][1] = torch.zeros(5, device=device), torch.zeros(5, device=device)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\]"):
        torch.ops.fmcore.adamw_step_(*args)
    args = _op_args(device)
    flat = torch.zeros(11, device=device)  # exp_avgs as views of one buffer, side by side: fine
    args[2] = [flat[:5], flat[5:]]
    torch.ops.fmcore.adamw_step_(*args)
    args[3] = [flat[:5], torch.zeros(6, device=device)]  # exp_avg_sqs[0] is exp_avgs[0]
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] and exp_avgs\[0\]|exp_avgs\[0\] and exp_avg_sqs\[0\]"):
        torch.ops.fmcore.adamw_step_(*args)


def test_op_refuses_grads_viewing_what_it_updates_but_their_own(device):
    # b.grad = a.detach(): b's gradient was read while a was updated (a race on CUDA; on the CPU the
    # result of the update order, as torch's single-tensor AdamW). A gradient that is its own param or
    # state exactly is read before its own thread writes it: allowed, as torch allows it.
    args = _op_args(device)
    buf = torch.randn(12, device=device)
    args[0] = [buf[:5], buf[6:]]
    args[1] = [torch.randn(5, device=device), buf[:6]]
    with pytest.raises(ValueError, match=r"expected grads\[1\] not to share memory .* overlapping params\[0\]"):
        torch.ops.fmcore.adamw_step_(*args)
    args[1][1] = buf[:6].clone()  # a copy: fine
    torch.ops.fmcore.adamw_step_(*args)
    args[1] = [args[0][0], args[2][1]]  # grads[0] is params[0], grads[1] is exp_avgs[1]
    torch.ops.fmcore.adamw_step_(*args)
    args[1] = [args[2][1][:5], args[2][1]]  # grads[0] views exp_avgs[1]
    with pytest.raises(ValueError, match=r"grads\[0\] not to share memory .* overlapping exp_avgs\[1\]"):
        torch.ops.fmcore.adamw_step_(*args)


@pytest.mark.cuda
def test_op_device_mismatch_cuda():
    args = _op_args("cuda")
    args[1][1] = args[1][1].cpu()
    with pytest.raises(RuntimeError, match=r"grads\[1\] on the device of params\[0\]"):
        torch.ops.fmcore.adamw_step_(*args)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
def test_opcheck(device, master):
    dtype = torch.bfloat16 if master else torch.float32
    torch.library.opcheck(torch.ops.fmcore.adamw_step_.default, _op_args(device, dtype=dtype, master=master))
    tensors = [torch.randn(9, device=device), torch.randn(4, 3, device=device, dtype=torch.bfloat16)]
    norm = torch.empty((), device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.fmcore.grad_norm_.default, (tensors, norm, count))


def test_step_under_torch_compile(device):
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    a_p = make_params(device, [(37, 5), (70001,)])
    b_p = clone_params(a_p)
    a = FusedAdamW(a_p, lr=1e-2, max_grad_norm=1.0)
    b = FusedAdamW(b_p, lr=1e-2, max_grad_norm=1.0)
    torch._dynamo.reset()
    compiled_step = torch.compile(b.step, backend=backend, fullgraph=True)
    for s in range(3):
        grads = random_grads(a_p, s)
        set_grads(a_p, grads)
        set_grads(b_p, grads)
        a.step()
        compiled_step()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p, q)
    assert torch.equal(a.last_grad_norm, b.last_grad_norm)


@pytest.mark.cuda
def test_step_in_cuda_graph():
    # The whole step (norm, clip, update, step counts) captured once and replayed with new grads
    # copied into the same grad tensors and a schedule written into the lr tensor: no host sync.
    dev = torch.device("cuda")
    a_p = make_params(dev, [(37, 5), (70001,), (1,)])
    b_p = clone_params(a_p)
    lr_a, lr_b = torch.tensor(1e-2, device=dev), torch.tensor(1e-2, device=dev)
    a = FusedAdamW(a_p, lr=lr_a, max_grad_norm=1.0, skip_nonfinite=True)
    b = FusedAdamW(b_p, lr=lr_b, max_grad_norm=1.0, skip_nonfinite=True)
    grads = random_grads(a_p, 0)
    set_grads(a_p, grads)
    set_grads(b_p, grads)
    a.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        b.step()  # eager warm-up: creates the state outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.step()
    for s in range(1, 6):
        grads = random_grads(a_p, s)
        if s == 4:
            grads[1][7] = float("nan")  # a skipped step, decided on the device
        set_grads(a_p, grads)
        for p, g in zip(b_p, grads):
            p.grad.copy_(g)
        if s == 3:
            lr_a.fill_(5e-3)
            lr_b.fill_(5e-3)
        a.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p, q)
        assert b.state[q]["step"].item() == 5  # 6 steps, one skipped
    assert b.skipped_steps.item() == 1 and torch.equal(a.last_grad_norm, b.last_grad_norm)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_striding_over_many_chunks_cuda(dtype):
    # 11.4M elements: more update chunks (8192 elements) and norm chunks (16384) than blocks fit on
    # the GPU, so each block strides over several chunks, crossing from one tensor into the next.
    dev = torch.device("cuda")
    shapes = [(4096, 2048), (37, 5), (3_000_001,), (1,)]
    ours_p = make_params(dev, shapes, dtype=dtype)
    ref_p = clone_params(ours_p, torch.float32)
    ours = FusedAdamW(ours_p, lr=1e-2, max_grad_norm=100.0, master_weights=True)
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    for s in range(5):
        grads = random_grads(ours_p, s)
        set_grads(ours_p, grads)
        set_grads(ref_p, [g.float() for g in grads])
        ours.step()
        total = torch.nn.utils.clip_grad_norm_(ref_p, 100.0)
        ref.step()
        assert rel_diff(ours.last_grad_norm, norm64(grads)) < 1e-6
        assert rel_diff(ours.last_grad_norm, total) < 1e-5
    for p, q in zip(ours_p, ref_p):
        value = ours.state[p]["master_param"] if dtype != torch.float32 else p
        assert rel_diff(value, q) < 1e-6


def test_lr_scheduler_drives_float_and_tensor_lr(device):
    # torch's schedulers write group["lr"] (fill_ into a tensor lr): both forms follow them.
    ours_p = make_params(device)
    ten_p = clone_params(ours_p)
    ref_p = clone_params(ours_p)
    ours = FusedAdamW(ours_p, lr=1e-2)
    ten = FusedAdamW(ten_p, lr=torch.tensor(1e-2, device=device))
    ref = torch.optim.AdamW(ref_p, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, ten, ref)]
    for s in range(6):
        grads = random_grads(ours_p, s)
        for ps in (ours_p, ten_p, ref_p):
            set_grads(ps, grads)
        for o, sched in zip((ours, ten, ref), scheds):
            o.step()
            sched.step()
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 1e-2 / 8
    assert_params_match(ours_p, ref_p)
    assert_params_match(ten_p, ref_p, bound=1e-5)  # the tensor lr is fp32: 1e-2 is not exact in it


# ---- what a torch.optim.AdamW user does with an optimizer object

def _two_steps(opt, params):
    for s in range(2):
        set_grads(params, random_grads(params, s))
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_optimizer_steps_as_the_original(tmp_path, how):
    # torch.optim.Optimizer pickles defaults, state and param_groups only: the copy lacked
    # master_weights & co. and its step() raised AttributeError.
    params = make_params("cpu", dtype=torch.bfloat16)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, master_weights=True, skip_nonfinite=True)
    _two_steps(opt, params)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        torch.save((params, opt), tmp_path / "o.pt")
        params2, opt2 = torch.load(tmp_path / "o.pt", weights_only=False)
    for o, ps in ((opt, params), (opt2, params2)):
        set_grads(ps, random_grads(ps, 7))
        o.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert opt2.master_weights and torch.equal(opt2.last_grad_norm, opt.last_grad_norm)


def test_state_reset_or_group_params_replaced_are_seen():
    # The step's plan is cached: a reset state or a replaced params list must not step the old tensors.
    def pair():
        ps = make_params("cpu", shapes=[(5,), (3,)])
        return FusedAdamW(ps, lr=0.1, weight_decay=0.0), torch.optim.AdamW(clone_params(ps), lr=0.1, weight_decay=0.0)
    for change in ("reset", "clear", "replace"):
        ours, ref = pair()
        ours_p, ref_p = ours.param_groups[0]["params"], ref.param_groups[0]["params"]
        _two_steps(ours, ours_p)
        _two_steps(ref, ref_p)
        if change == "reset":
            ours.state, ref.state = type(ours.state)(dict), type(ref.state)(dict)
        elif change == "clear":
            ours.state.clear()
            ref.state.clear()
        else:
            new_ours, new_ref = (make_params("cpu", shapes=[(5,), (3,)], seed=9) for _ in range(2))
            ours.param_groups[0]["params"], ref.param_groups[0]["params"] = new_ours, new_ref
            ours_p, ref_p = new_ours, new_ref
        _two_steps(ours, ours_p)
        _two_steps(ref, ref_p)
        for a, b in zip(ours_p, ref_p):
            assert rel_diff(a, b) < 1e-6, change


@pytest.mark.parametrize("change", ["moments assigned", "step assigned", "entry deleted and rebuilt"])
def test_state_tensors_assigned_anew_are_seen(change):
    # torch.optim.AdamW reads state[p] at every step. The cached plan kept stepping the old tensors
    # when a moment or step tensor was assigned anew (what state_dict() saved then never moved), and
    # when a param's state dict was deleted and rebuilt (the new dict had the freed one's id()).
    ours_p = make_params("cpu", shapes=[(5,), (3,)])
    ref_p = clone_params(ours_p)
    ours, ref = FusedAdamW(ours_p, lr=0.1), torch.optim.AdamW(ref_p, lr=0.1)
    for opt, params in ((ours, ours_p), (ref, ref_p)):
        _two_steps(opt, params)
        for p in params:
            if change == "moments assigned":
                opt.state[p]["exp_avg"] = torch.zeros_like(p)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            elif change == "step assigned":
                opt.state[p]["step"] = torch.tensor(0.0)
            else:
                del opt.state[p]
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        _two_steps(opt, params)
    for a, b in zip(ours_p, ref_p):
        assert rel_diff(a, b) < 1e-6
        assert ours.state[a]["step"].item() == ref.state[b]["step"].item()
        assert rel_diff(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"]) < 1e-6


def test_load_state_dict_checks_shapes_and_runs_the_hooks():
    params = make_params("cpu", shapes=[(7, 5)])
    opt = FusedAdamW(params, lr=1e-2)
    _two_steps(opt, params)
    sd = opt.state_dict()
    other = FusedAdamW(make_params("cpu", shapes=[(3, 7, 5)]), lr=1e-2)
    with pytest.raises(ValueError, match=r"exp_avg of param 0 of group 0 has shape \(7, 5\), the param \(3, 7, 5\)"):
        other.load_state_dict(sd)  # copy_ would broadcast the moments silently
    # torch.optim's load hooks: a pre-hook's returned dict is what loads; a post-hook sees the final state
    fresh = FusedAdamW(clone_params(params), lr=1e-2)

    def reset_step(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for st in state_dict["state"].values():
            st["step"] = torch.tensor(0.0)
        return state_dict

    fresh.register_load_state_dict_pre_hook(reset_step)
    fresh.register_load_state_dict_post_hook(lambda o: [st["exp_avg"].zero_() for st in o.state.values()])
    fresh.load_state_dict(sd)
    (st,) = fresh.state.values()
    assert st["step"].item() == 0.0 and not st["exp_avg"].any() and st["exp_avg"].dtype == torch.float32


def test_bad_lr_tensor_and_group_flags_set_later_are_refused():
    p = make_params("cpu", shapes=[(4,)])
    for lr in (torch.tensor(-1e-2), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="expected lr >= 0"):
            FusedAdamW(p, lr=lr)
    opt = FusedAdamW(p, lr=1e-2)
    opt.param_groups[0]["maximize"] = True  # torch would ascend; FusedAdamW must not silently descend
    set_grads(p, random_grads(p, 0))
    with pytest.raises(ValueError, match="maximize"):
        opt.step()
    opt.param_groups[0]["maximize"] = False
    opt.param_groups[0]["lr"] = torch.tensor([1e-2, 1e-2])  # (a scheduler's tensor of the wrong shape)
    with pytest.raises(ValueError, match=r"expected lr to be a float or a one-element tensor, got shape \(2,\)"):
        opt.step()


def test_torch_adamw_keywords():
    # A drop-in for torch.optim.AdamW(..., amsgrad=False, fused=True) (HF's adamw_torch_fused,
    # torchtitan's foreach/fused) was a TypeError; what FusedAdamW cannot do is refused by name.
    p = make_params("cpu", shapes=[(4,)])
    FusedAdamW(p, lr=1e-2, amsgrad=False, maximize=False, foreach=True, fused=True, capturable=True,
               differentiable=False)
    for flag in ("amsgrad", "maximize", "differentiable"):
        with pytest.raises(ValueError, match=f"{flag}=True"):
            FusedAdamW(p, lr=1e-2, **{flag: True})
    # A differentiable group was stepped under no_grad: a non-leaf param changed, its graph did not
    w = torch.randn(3, requires_grad=True)
    x = w * 1.0
    x.retain_grad()
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedAdamW([{"params": [x], "differentiable": True}], lr=0.1)
    with pytest.raises(ValueError, match=r"FusedAdamW is AdamW \(decoupled weight decay\); got a torch.optim.Adam"):
        FusedAdamW([{"params": p, "decoupled_weight_decay": False}], lr=0.1)  # torch.optim.Adam's param_groups


def test_step_takes_a_closure_as_torch_adamw():
    a_p = make_params("cpu", shapes=[(3, 4), (5,)])
    b_p = clone_params(a_p)
    x = torch.randn(4)

    def closure_of(params, opt):
        def closure():  # the loss, its gradients computed inside step()
            opt.zero_grad()
            loss = (params[0] @ x).square().sum() + params[1].square().sum()
            loss.backward()
            return loss
        return closure

    a, b = FusedAdamW(a_p, lr=1e-2), torch.optim.AdamW(b_p, lr=1e-2)
    for _ in range(2):
        assert a.step(closure_of(a_p, a)).item() == b.step(closure_of(b_p, b)).item()
    for p, q in zip(a_p, b_p):
        torch.testing.assert_close(p, q)


def test_load_state_dict_pre_hook_leaves_the_callers_dict():
    # torch.optim hands the pre-hooks a shallow copy: what they assign stays out of the caller's dict
    params = make_params("cpu", shapes=[(3,)])
    opt = FusedAdamW(params, lr=1e-2)
    _two_steps(opt, params)
    sd = opt.state_dict()
    fresh = FusedAdamW(clone_params(params), lr=1e-2)
    fresh.register_load_state_dict_pre_hook(lambda optimizer, state_dict: state_dict.update(state={}))
    fresh.load_state_dict(sd)
    assert len(fresh.state) == 0 and len(sd["state"]) == 1


def test_a_missing_master_copy_is_made_from_the_param():
    # A param made bf16 after its state was created (model.to(torch.bfloat16) mid-run): the cached
    # plan stepped it without a master copy (or, rebuilt, raised KeyError: 'master_param'). The step
    # makes the missing copy from the param, as after loading a torch.optim.AdamW checkpoint.
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW(model.parameters(), lr=1e-2, master_weights=True)
    params = list(model.parameters())
    _two_steps(opt, params)
    model.to(torch.bfloat16)
    _two_steps(opt, params)
    for p in params:
        state = opt.state[p]
        assert state["master_param"].dtype == torch.float32 and state["step"].item() == 4
        assert torch.equal(state["master_param"].to(torch.bfloat16), p)


def test_master_weights_take_up_weights_edited_between_steps(device):
    # model.load_state_dict (an EMA copy-back, pruning) between steps: the update read only the fp32
    # master copy, so the next step wrote the old weights back over the edit (max |w| 0.48 here).
    model = torch.nn.Linear(64, 32).to(device, torch.bfloat16)
    opt = FusedAdamW(model.parameters(), lr=1e-3, master_weights=True)
    for _ in range(2):
        model(torch.randn(8, 64, device=device, dtype=torch.bfloat16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    kept = model.weight[:, 1:].detach().clone()
    with torch.no_grad():
        model.weight[:, 0] = 0.0  # a pruned column
    model(torch.randn(8, 64, device=device, dtype=torch.bfloat16)).square().mean().backward()
    opt.step()
    assert model.weight[:, 0].abs().max() <= 2e-3  # one step of lr 1e-3 from 0
    assert (model.weight[:, 1:].float() - kept.float()).abs().max() <= 2e-3  # the rest from their masters
    assert torch.equal(opt.state[model.weight]["master_param"].to(torch.bfloat16), model.weight)


def test_load_state_dict_into_other_groups_says_so():
    # The same model's params grouped otherwise (biases moved to a no-decay group) were "a state
    # dict of another model"; torch.optim's loader says the groups differ. Reordered params: ours
    # refuses (torch loads each moment into another param), saying order is one cause.
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = FusedAdamW(params, lr=1e-2)
    _two_steps(opt, params)
    sd = opt.state_dict()
    regrouped = FusedAdamW([{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}], lr=1e-2)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        regrouped.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"param 0 of group 0 has shape \(16, 8\), the param \(4,\).*another order"):
        FusedAdamW(params[::-1], lr=1e-2).load_state_dict(sd)
