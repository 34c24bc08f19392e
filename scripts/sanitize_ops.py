"""Run every CUDA op once, forward and backward, on small awkward shapes: the workload that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck). Keep it small:
the sanitizer slows kernels down 10-100x.

    python scripts/sanitize_ops.py [rope|attention|cross_entropy|adamw|add_norm|activation ...]   # default: all"""

import os
import sys

import torch

import fmcore.ops as ops

dev = os.environ.get("FMCORE_SANITIZE_DEVICE", "cuda")  # "cpu" checks the script itself


def rope():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for interleaved in (False, True):
            # S=37 and the 1-element storage offset exercise the tail and the unaligned (scalar) path
            base = torch.randn(2 * 37 * 6 * 96 + 1, device=dev, dtype=dtype)
            q = base[1:].view(2, 37, 6, 96).detach().requires_grad_()
            k = torch.randn(2, 37, 2, 96, device=dev, dtype=dtype, requires_grad=True)
            theta = torch.rand(40, 32, device=dev)
            oq, ok = ops.apply_rotary(q, k, theta.cos(), theta.sin(), interleaved=interleaved)
            (oq.float().sum() + ok.float().sum()).backward()
            ops.apply_rotary(q.detach(), k.detach(), theta.cos(), theta.sin(), interleaved=interleaved, inplace=True)


def attention():
    # Tails, causal Sq != Sk (both ways), rows with no visible key, GQA/MQA, every head dim, varlen with
    # empty and length-1 documents: every kernel path of the forward, the delta, dk/dv and dq kernels,
    # and the backward's two dq paths (atomic adds from the dk/dv kernel, and the deterministic one).
    from fmcore._C import attention_tile_configs
    from fmcore.ops import flash_attention, flash_attention_varlen

    # Every tile configuration in bf16 (the kernels are the same templates in fp16, but for the wgmma
    # instructions of 3 to 6, so 3 runs in fp16 too).
    for D in (64, 96, 128):
        for dt, configs in ((torch.bfloat16, range(attention_tile_configs)), (torch.float16, (0, 3))):
            for B, Sq, Sk, Hq, Hk, causal in [(2, 77, 77, 4, 2, True), (1, 130, 45, 3, 1, True), (1, 17, 200, 2, 2, True),
                                              (1, 65, 129, 2, 1, False), (1, 1, 1, 1, 1, False)]:
                for deterministic in (False, True):
                    for tiles in configs:
                        q = torch.randn(B, Sq, Hq, D, device=dev, dtype=dt, requires_grad=True)
                        k = torch.randn(B, Sk, Hk, D, device=dev, dtype=dt, requires_grad=True)
                        v = torch.randn(B, Sk, Hk, D, device=dev, dtype=dt, requires_grad=True)
                        out, lse = flash_attention(q, k, v, causal=causal, deterministic=deterministic,
                                                   return_lse=True, tiles=tiles)
                        (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
    lens_q, lens_k = [1, 0, 70, 3, 130], [5, 2, 0, 3, 64]
    cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens_q), 4, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for deterministic in (False, True):
        flash_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True,
                               deterministic=deterministic).float().sum().backward()
    # The wgmma probe (tests/ops/test_wgmma_probe.py), in each form, where it runs.
    from fmcore import _C

    if dev == "cuda" and "9.0a" in _C.build_info()["cuda_archs"] and torch.cuda.get_device_capability()[0] == 9:
        for form in ("ss", "ss_mn", "rs"):
            for n in (64, 128):
                x = torch.randn((128, 64) if form == "ss_mn" else (64, 128), device=dev, dtype=torch.bfloat16)
                y = torch.randn((n, 128) if form == "ss" else (128, n), device=dev, dtype=torch.bfloat16)
                _C._wgmma_probe(form, x, y)


def cross_entropy():
    # V=7 and 32001 (no multiple of the vector width), ignored targets, both backward paths.
    for V in (7, 32001):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            logits = torch.randn(37, V, device=dev, dtype=dt, requires_grad=True)
            target = torch.randint(0, V, (37,), device=dev)
            target[::5] = -100
            ops.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4).backward()
            x = torch.randn(37, V, device=dev, dtype=dt, requires_grad=True)
            ops.cross_entropy(x * 1, target, inplace_backward=True).backward()
    hidden = torch.randn(45, 96, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1001, 96, device=dev, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 1001, (45,), device=dev)
    ops.linear_cross_entropy(hidden, weight, target, chunk_size=16).backward()


def adamw():
    # Odd sizes (vector tails), an unaligned view, bf16 params with master weights, clipping.
    from fmcore.optim import FusedAdamW

    for dt, master in ((torch.float32, False), (torch.bfloat16, True)):
        base = torch.randn(1 + 4097, device=dev, dtype=dt)
        params = [torch.nn.Parameter(torch.randn(n, device=dev, dtype=dt)) for n in (1, 7, 8193, 70001)]
        params.append(torch.nn.Parameter(base[1:]))
        for p in params:
            p.grad = torch.randn_like(p)
        opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0, master_weights=master, skip_nonfinite=True)
        for _ in range(2):
            opt.step()


def add_norm():
    # Every row layout: warp rows of 1, 2, 4 vectors (D 64, 512, 768), block rows of 2 and 4 vectors
    # (D 2048, 6144: 48 KiB of backward smem, 8200), scalar rows of 4..32 elements a thread
    # (D 1000, 3000, 6000, 12000, and an unaligned view); fp32 and bf16 streams, with and without a
    # residual, LayerNorm and RMSNorm.
    for D in (64, 512, 768, 1000, 2048, 3000, 6000, 6144, 8200, 12000):
        for res_dt, kind in ((torch.float32, "layer"), (torch.bfloat16, "rms")):
            x = torch.randn(37, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            r = torch.randn(37, D, device=dev, dtype=res_dt, requires_grad=True)
            w = torch.randn(D, device=dev, dtype=res_dt, requires_grad=True)
            b = torch.randn(D, device=dev, dtype=res_dt, requires_grad=True) if kind == "layer" else None
            out, stream = ops.add_norm(x, r, w, b, kind=kind, out_dtype=torch.bfloat16)
            (out.float().sum() + stream.float().sum()).backward()
            ops.add_norm(x, None, w, b, kind=kind)[0].float().sum().backward()
    base = torch.randn(5 * 768 + 1, device=dev, dtype=torch.bfloat16)
    x = base[1:].view(5, 768).detach().requires_grad_()
    w = torch.randn(768, device=dev, requires_grad=True)
    ops.add_norm(x, torch.randn(5, 768, device=dev), w)[0].float().sum().backward()
    # Backward asked for part of the gradients (needs_input_grad): the weights' alone (no row
    # gradients), the rows' alone (frozen weights: no sums, no workspace), the bias's alone.
    for D in (768, 3000, 8200):
        s = torch.randn(37, D, device=dev)
        w = torch.randn(D, device=dev)
        _, _, mean, rstd = torch.ops.fmcore.add_norm_fwd(s, None, w, None, 1e-5, False, torch.float32)
        for grad_input, grad_weight, has_bias in ((False, True, True), (True, False, False), (False, False, True)):
            torch.ops.fmcore.add_norm_bwd(torch.randn_like(s), None, s, w, mean, rstd, False, False, has_bias,
                                          torch.float32, None, grad_input, grad_weight)


def activation():
    # bias_gelu: the vector path over several row blocks and column tiles (the last partial), the
    # scalar path (D not a multiple of 8; an unaligned view), no bias, both forms, bf16 with an fp32
    # bias. swiglu: packed and separate, vector and scalar paths, an unaligned packed view.
    for rows, D in ((300, 2056), (37, 1001), (0, 64)):
        for dt, bias_dt in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
            x = torch.randn(rows, D, device=dev, dtype=dt, requires_grad=True)
            b = torch.randn(D, device=dev, dtype=bias_dt, requires_grad=True)
            for approximate in ("none", "tanh"):
                ops.bias_gelu(x, b, approximate=approximate).float().sum().backward()
            ops.bias_gelu(x, None).float().sum().backward()
            if D % 2 == 0:  # packed: gate and up the halves of x
                ops.swiglu(x).float().sum().backward()
            ops.swiglu(x, x.detach().clone().requires_grad_()).float().sum().backward()
    base = torch.randn(5 * 64 + 1, device=dev, dtype=torch.bfloat16)
    ops.bias_gelu(base[1:].view(5, 64).requires_grad_(), torch.zeros(64, device=dev, requires_grad=True)).sum().backward()
    ops.swiglu(base[1:].view(5, 64).requires_grad_()).sum().backward()


CHECKS = [rope, attention, cross_entropy, adamw, add_norm, activation]

if __name__ == "__main__":
    # Op names on the command line run only those (racecheck is slow enough to need one op at a time).
    by_name = {c.__name__: c for c in CHECKS}
    unknown = [a for a in sys.argv[1:] if a not in by_name]
    if unknown:
        sys.exit(f"unknown op check(s) {unknown}: expected some of {list(by_name)}")
    checks = [by_name[a] for a in sys.argv[1:]] or CHECKS
    for check in checks:
        check()
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"ran {len(checks)} op checks: {', '.join(c.__name__ for c in checks)}")
