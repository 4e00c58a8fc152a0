"""Micro-batch clipping in the CPU peers of issue 3 (numpy, JAX jit, PyTorch eager and
torch.compile), on this machine.

The same operation and shapes as `bench_report --backend cpu`: per-sample
gradients x of shape [N, D] (f32), M = N / b micro-batches of b consecutive rows,
g_j = mean of micro-batch j, s_j = min(1, C / ||g_j||), out = mean_j s_j g_j, with
C the median micro-batch norm (about half the micro-batches clipped). Prints a
markdown table of medians over --runs timed calls after 2 warm-up calls, each
beside a plain sum over the same array in the same framework (its read floor).

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install numpy jax torch
    /tmp/peers/bin/python benches/peers/clip_peers.py [--runs 11] [--scale 1] [--half]

A framework that is not installed gets NaN columns. PyTorch runs on its
default thread count (the machine's cores); torch.compile (inductor, which
compiles C++ with the system's compiler) is warmed up like the others.

With --half, a second table times the main shape with f16 and bf16 inputs, as
bench_report's 16-bit rows: JAX jit widening to f32 inside the jitted function
(XLA fuses the conversion into the reductions), torch.compile the same way,
PyTorch eager and numpy (f16 only; it has no bf16 type) converting to f32 first.

Not run by CI; the figures go into BENCHMARKS.md beside microclip's CPU rows.
"""

import argparse
import statistics
import time

import numpy as np

HALF_CASES = [  # (N, D, b) of bench_report's 16-bit rows
    (256, 1_000_000, 1),
    (256, 1_000_000, 8),
]

CASES = [  # (name, N, D, b), as bench_report's CPU cases
    ("main", 256, 1_000_000, 1),
    ("main", 256, 1_000_000, 8),
    ("main", 256, 1_000_000, 32),
    ("wide", 64, 4_000_000, 4),
    ("tall", 1024, 65_536, 16),
]


def numpy_clip(x, b, c):
    n, d = x.shape
    g = x.reshape(n // b, b, d).mean(axis=1)
    norms = np.sqrt(np.einsum("md,md->m", g, g))
    s = np.minimum(1.0, c / norms).astype(np.float32)
    return (s @ g) / g.shape[0]


def torch_clip(torch, x, b, c):
    n, d = x.shape
    g = x.reshape(n // b, b, d).mean(dim=1)
    norms = torch.sqrt((g * g).sum(dim=1))
    s = torch.clamp(c / norms, max=1.0)
    return (s @ g) / g.shape[0]


def load_torch():
    """(torch, eager clip, compiled clip, compiled clip widening 16-bit input), or Nones."""
    try:
        import torch
    except ImportError:
        return None, None, None, None
    eager = lambda x, b, c: torch_clip(torch, x, b, c)  # noqa: E731
    compiled = torch.compile(eager, dynamic=False)
    widening = torch.compile(lambda x, b, c: torch_clip(torch, x.float(), b, c), dynamic=False)
    return torch, eager, compiled, widening


def median_ms(f, runs):
    for _ in range(2):
        f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--scale", type=int, default=1, help="divide every D by this")
    ap.add_argument("--half", action="store_true", help="also time f16 and bf16 inputs")
    args = ap.parse_args()
    try:
        import jax
        import jax.numpy as jnp

        jax_clip = jax.jit(
            lambda x, c, b: _jax_clip(jnp, x, c, b), static_argnums=(2,)
        )
        jax_sum = jax.jit(jnp.sum)
        jax_clip_wide = jax.jit(
            lambda x, c, b: _jax_clip(jnp, x.astype(jnp.float32), c, b), static_argnums=(2,)
        )
        jax_name = f"JAX {jax.__version__} jit ({jax.devices()[0].platform})"
    except ImportError:
        jax = None
        jax_name = "JAX (not installed)"
    torch, torch_eager, torch_compiled, torch_widening = load_torch()
    torch_name = (
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "PyTorch (not installed)"
    )
    print(f"numpy {np.__version__}; {jax_name}; {torch_name}; median of {args.runs} runs after 2 warm-up")
    print()
    print(
        "| case | N | D | b | numpy ms | numpy sum ms | JAX jit ms | JAX sum ms | JAX vs numpy rel L2 "
        "| torch eager ms | torch.compile ms | torch sum ms | torch.compile vs numpy rel L2 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(7)
    for name, n, d, b in CASES:
        d = max(1, d // args.scale)
        x = rng.standard_normal((n, d), dtype=np.float32)
        g = x.reshape(n // b, b, d).mean(axis=1)
        c = float(np.median(np.linalg.norm(g, axis=1)))
        del g
        want = numpy_clip(x, b, c)
        np_ms = median_ms(lambda: numpy_clip(x, b, c), args.runs)
        np_sum = median_ms(lambda: x.sum(), args.runs)
        jax_ms = jax_sum_ms = err = float("nan")
        if jax is not None:
            xj = jax.device_put(x)
            got = np.asarray(jax_clip(xj, c, b))
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            # Both accumulate in f32 (JAX's XLA sums are less exact: about 1e-4
            # relative over 4M columns).
            assert err < 1e-3, f"JAX and numpy disagree: rel L2 {err:.1e}"
            jax_ms = median_ms(lambda: jax_clip(xj, c, b).block_until_ready(), args.runs)
            jax_sum_ms = median_ms(lambda: jax_sum(xj).block_until_ready(), args.runs)
            del xj
        eager_ms = compiled_ms = torch_sum_ms = torch_err = float("nan")
        if torch is not None:
            xt = torch.from_numpy(x)
            got = torch_compiled(xt, b, c).numpy()
            torch_err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert torch_err < 1e-3, f"torch.compile and numpy disagree: rel L2 {torch_err:.1e}"
            eager_ms = median_ms(lambda: torch_eager(xt, b, c), args.runs)
            compiled_ms = median_ms(lambda: torch_compiled(xt, b, c), args.runs)
            torch_sum_ms = median_ms(lambda: xt.sum(), args.runs)
            del xt
        print(
            f"| {name} | {n} | {d} | {b} | {np_ms:.1f} | {np_sum:.1f} | {jax_ms:.1f} | {jax_sum_ms:.1f} | {err:.1e} "
            f"| {eager_ms:.1f} | {compiled_ms:.1f} | {torch_sum_ms:.1f} | {torch_err:.1e} |",
            flush=True,
        )
        del x
    if args.half:
        half_table(
            args,
            rng,
            jax,
            jax_clip_wide if jax is not None else None,
            (torch, torch_eager, torch_widening),
        )


def half_table(args, rng, jax, jax_clip_wide, torch_fns):
    """f16 and bf16 inputs of the main shape (16-bit values, f32 arithmetic)."""
    torch, torch_eager, torch_widening = torch_fns
    print()
    print(
        "| case | dtype | N | D | b | numpy ms | JAX jit ms | JAX vs f32 numpy rel L2 "
        "| torch eager ms | torch.compile ms | torch.compile vs f32 numpy rel L2 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, d, b in HALF_CASES:
        d = max(1, d // args.scale)
        x = rng.standard_normal((n, d), dtype=np.float32)
        for name in ["f16", "bf16"]:
            np_ms = jax_ms = err = float("nan")
            if name == "f16":
                x16 = x.astype(np.float16)
                wide = x16.astype(np.float32)
            elif jax is not None:
                import jax.numpy as jnp

                x16 = np.asarray(jnp.asarray(x, dtype=jnp.bfloat16))
                wide = x16.astype(np.float32)
            else:
                continue
            g = wide.reshape(n // b, b, d).mean(axis=1)
            c = float(np.median(np.linalg.norm(g, axis=1)))
            del g
            want = numpy_clip(wide, b, c)
            del wide
            if name == "f16":
                np_ms = median_ms(lambda: numpy_clip(x16.astype(np.float32), b, c), args.runs)
            if jax is not None:
                xj = jax.device_put(x16)
                got = np.asarray(jax_clip_wide(xj, c, b))
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert err < 1e-3, f"JAX and numpy disagree: rel L2 {err:.1e}"
                jax_ms = median_ms(lambda: jax_clip_wide(xj, c, b).block_until_ready(), args.runs)
                del xj
            eager_ms = compiled_ms = torch_err = float("nan")
            if torch is not None:
                dtype = torch.float16 if name == "f16" else torch.bfloat16
                # The same 16-bit values as x16 (numpy has no bf16: cast in torch).
                xt = torch.from_numpy(x).to(dtype)
                got = torch_widening(xt, b, c).numpy()
                torch_err = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert torch_err < 1e-3, f"torch.compile and numpy disagree: rel L2 {torch_err:.1e}"
                eager_ms = median_ms(lambda: torch_eager(xt.float(), b, c), args.runs)
                compiled_ms = median_ms(lambda: torch_widening(xt, b, c), args.runs)
                del xt
            print(
                f"| main | {name} | {n} | {d} | {b} | {np_ms:.1f} | {jax_ms:.1f} | {err:.1e} "
                f"| {eager_ms:.1f} | {compiled_ms:.1f} | {torch_err:.1e} |",
                flush=True,
            )
            del x16
        del x


def _jax_clip(jnp, x, c, b):
    n, d = x.shape
    g = x.reshape(n // b, b, d).mean(axis=1)
    norms = jnp.sqrt(jnp.sum(g * g, axis=1))
    s = jnp.minimum(1.0, c / norms)
    return (s @ g) / g.shape[0]


if __name__ == "__main__":
    main()
