"""Training-step and inference speed: segjax's U-Net vs the same network in PyTorch, one process.

The JAX side is the real module from `segjax.models` (built from a config); the PyTorch side is the
same topology written with torch.nn (conv3x3-BN-ReLU x2 per level, 2x2 max-pool, 2x2 stride-2
transposed conv, concatenated skips, 1x1 head); the script checks that both have the same number
of parameters. Steps alternate between the frameworks so machine noise hits both alike; both use
all cores (thread counts printed). Loss: pixel cross-entropy; optimizer: Adam.

  pip install -r requirements-bench.txt
  python benchmarks/train_bench.py [--size 128 --batch 8 --depth 4 --base 32 --steps 20 --compile]
  python benchmarks/train_bench.py --dims 3 --size 32 --batch 2 --depth 3 --base 8    # 3D U-Net
  python benchmarks/train_bench.py --arch unetpp --size 64 --depth 3 --base 16          # U-Net++, deep supervision
  python benchmarks/train_bench.py --arch vnet --dims 3 --size 32 --batch 2 --depth 3 --base 8   # V-Net
  # GPU (both frameworks on the GPU; bf16 = segjax model.dtype='bfloat16' vs PyTorch AMP bf16):
  python benchmarks/train_bench.py --size 512 --batch 16 --dtype bfloat16 --compile --peak

On a GPU, `--peak` measures the card's bf16 matrix-product rate (8192^3, jnp.dot) and prints each
framework's model FLOP utilisation: 3 x forward FLOPs (the convolutions and matrix products in
segjax's forward, counted from its jaxpr by `segjax.flops`) x steps/s over that rate.
`--json FILE` appends one JSON line of results. `--pipelined N` also times N steps back to back
with one sync at the end (the rate of a training loop that does not wait for each step, as
segjax's own). `--xla "K=V[;K2=V2]"` (repeatable) adds a segjax runner whose step is compiled with
those XLA options (e.g. `xla_gpu_enable_command_buffer=+CONVOLUTION`), timed alongside the rest;
`--norm_form dot|vjp|rows` (repeatable) one whose batch norm computes its sums another way
(`norm_forms.py`); `--xla_weight_grads` one that keeps XLA's 3x3 weight gradients on CPU
(segjax's default uses `segjax.kernels.conv3x3` there).

Last line: `speedup vs torch eager: <N>x, vs channels_last: <M>x, vs torch.compile: <K>x`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import norm_forms
import numpy as np

from segjax import optim, state, steps
from segjax.configuration import default_config
from segjax.flops import count_flops
from segjax.kernels import conv3x3
from segjax.models import build_model


def torch_layers(torch, dims: int):
    """(conv, batch norm, max-pool, transposed conv) classes for 2D or 3D."""
    nn = torch.nn
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d
    return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d


def torch_block(torch, dims: int, cin: int, cout: int):
    """segjax's ConvBlock: 2 x (3x3 conv without bias -> batch norm -> ReLU)."""
    nn = torch.nn
    conv, bn, _, _ = torch_layers(torch, dims)
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False),
        bn(cout, momentum=0.1),
        nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False),
        bn(cout, momentum=0.1),
        nn.ReLU(inplace=True),
    )


def torch_unet(torch, dims: int, depth: int, base: int, in_ch: int, classes: int):
    nn = torch.nn
    conv, _, pool, up = torch_layers(torch, dims)

    def block(cin, cout):
        return torch_block(torch, dims, cin, cout)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            feats = [base * 2**i for i in range(depth)]
            self.down = nn.ModuleList()
            cin = in_ch
            for f in feats:
                self.down.append(block(cin, f))
                cin = f
            self.pool = pool(2)
            self.bottleneck = block(feats[-1], 2 * feats[-1])
            self.ups = nn.ModuleList()
            self.dec = nn.ModuleList()
            cin = 2 * feats[-1]
            for f in reversed(feats):
                self.ups.append(up(cin, f, 2, stride=2))
                self.dec.append(block(2 * f, f))
                cin = f
            self.head = conv(feats[0], classes, 1)

        def forward(self, x):
            skips = []
            for blk in self.down:
                x = blk(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for upsample, blk, skip in zip(self.ups, self.dec, reversed(skips), strict=True):
                x = blk(torch.cat([upsample(x), skip], 1))
            return self.head(x)

    return UNet()


def torch_unetpp(torch, dims: int, depth: int, base: int, in_ch: int, classes: int):
    """U-Net++ with deep supervision, as segjax.models.unetpp: nodes X^{i,j}, dense skips, one
    1x1 head per X^{0,j}; forward returns the list of head logits."""
    nn = torch.nn
    conv, _, pool, up = torch_layers(torch, dims)

    def block(cin, cout):
        return torch_block(torch, dims, cin, cout)

    feats = [base * 2**i for i in range(depth)] + [base * 2 ** (depth - 1) * 2]

    class UNetPP(nn.Module):
        def __init__(self):
            super().__init__()
            self.nodes, self.ups = nn.ModuleDict(), nn.ModuleDict()
            cin = in_ch
            for i in range(depth + 1):
                self.nodes[f"{i}_0"] = block(cin, feats[i])
                cin = feats[i]
            for j in range(1, depth + 1):
                for i in range(depth + 1 - j):
                    self.ups[f"{i}_{j}"] = up(feats[i + 1], feats[i], 2, stride=2)
                    self.nodes[f"{i}_{j}"] = block((j + 1) * feats[i], feats[i])
            self.heads = nn.ModuleList([conv(feats[0], classes, 1) for _ in range(depth)])
            self.pool = pool(2)

        def forward(self, x):
            x_ = {}
            for i in range(depth + 1):
                x = self.nodes[f"{i}_0"](x if i == 0 else self.pool(x_[i - 1, 0]))
                x_[i, 0] = x
            for j in range(1, depth + 1):
                for i in range(depth + 1 - j):
                    dense = [x_[i, k] for k in range(j)]
                    x_[i, j] = self.nodes[f"{i}_{j}"](torch.cat([*dense, self.ups[f"{i}_{j}"](x_[i + 1, j - 1])], 1))
            return [h(x_[0, j]) for j, h in zip(range(1, depth + 1), self.heads, strict=True)]

    return UNetPP()


def torch_vnet(torch, dims: int, depth: int, base: int, in_ch: int, classes: int, kernel: int):
    """V-Net as segjax.models.vnet: residual stages of 1-3 conv-BN-PReLU, strided-conv down,
    transposed-conv up, concatenated skips."""
    nn = torch.nn
    conv, bn, _, up = torch_layers(torch, dims)
    feats = [base * 2**i for i in range(depth + 1)]
    convs = [min(i + 1, 3) for i in range(depth + 1)]

    class Stage(nn.Module):
        def __init__(self, cin, cres, cout, n):
            super().__init__()
            layers = []
            for k in range(n):
                layers += [conv(cin if k == 0 else cout, cout, kernel, padding=kernel // 2), bn(cout)]
                if k < n - 1:
                    layers.append(nn.PReLU())
            self.body = nn.Sequential(*layers)
            self.project = conv(cres, cout, 1) if cres != cout else None
            self.act = nn.PReLU()

        def forward(self, x, residual):
            r = self.project(residual) if self.project is not None else residual
            return self.act(self.body(x) + r)

    class VNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.down, self.dec, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for i in range(depth + 1):
                if i:
                    self.down.append(nn.Sequential(conv(feats[i - 1], feats[i], 2, stride=2), bn(feats[i]), nn.PReLU()))
                cin = in_ch if i == 0 else feats[i]
                self.enc.append(Stage(cin, cin, feats[i], convs[i]))
            for i in reversed(range(depth)):
                self.up.append(nn.Sequential(up(feats[i + 1], feats[i], 2, stride=2), bn(feats[i]), nn.PReLU()))
                self.dec.append(Stage(2 * feats[i], feats[i], feats[i], convs[i]))
            self.head = conv(feats[0], classes, 1)

        def forward(self, x):
            encoded = []
            for i in range(depth + 1):
                if i:
                    x = self.down[i - 1](x)
                x = self.enc[i](x, x)
                encoded.append(x)
            for k, i in enumerate(reversed(range(depth))):
                u = self.up[k](x)
                x = self.dec[k](torch.cat([u, encoded[i]], 1), u)
            return self.head(x)

    return VNet()


def segjax_step(cfg, classes: int, image, label):
    """(jitted train step donating the state, jitted forward, initial state, batch) of segjax's
    network for `cfg`, with the benchmarks' loss and optimizer: pixel cross-entropy, Adam without
    gradient clipping or weight decay (as the PyTorch twin)."""
    cfg.loss.terms, cfg.optim.grad_clip, cfg.optim.weight_decay = "ce", 0.0, 0.0
    model = build_model(cfg.model, classes)
    st = state.create(model, optim.build(cfg.optim, 1000), jnp.asarray(image[:1]), 0)
    train = jax.jit(functools.partial(steps.train_step, model=model, loss_cfg=cfg.loss), donate_argnums=0)
    infer = jax.jit(lambda s, x: model.apply(s.variables(), x, train=False)[0])
    batch = {"image": jnp.asarray(image), "label": jnp.asarray(label), "valid": jnp.ones(label.shape, jnp.float32)}
    return train, infer, st, batch


def jax_runner(train, infer, st, batch):
    """(step(wait=True), forward(), wait()) for a jitted segjax step, as the PyTorch runners: the
    runner keeps its own (donated) state."""
    held = {"st": st, "out": None}

    def step(wait=True):
        held["st"], held["out"] = train(held["st"], batch)
        if wait:
            jax.block_until_ready(held["out"])

    def forward():
        jax.block_until_ready(infer(held["st"], batch["image"]))

    return step, forward, lambda: jax.block_until_ready(held["out"])


def parse_option(text: str):
    """'name=value' -> (name, bool | int | float | str): an XLA option as `compiler_options` takes it."""
    name, value = text.split("=", 1)
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for cast in (int, float):
        try:
            return name, cast(value)
        except ValueError:
            pass
    return name, value


def measure_peak(n: int = 8192, chain: int = 10, rounds: int = 5) -> float:
    """The device's bf16 matrix-product rate in FLOP/s: the fastest of `rounds` timings of `chain`
    back-to-back n^3 products on random data (one sync per chain, so dispatch and the sync do not
    count; a peak is the best rate, hence the fastest round, not the median)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready([dot(a, b) for _ in range(chain)])
        times.append(time.perf_counter() - t)
    return 2 * n**3 * chain / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["unet", "unetpp", "vnet"], default="unet")
    parser.add_argument("--dims", type=int, default=2)
    parser.add_argument("--kernel", type=int, default=3, help="V-Net kernel edge")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--pipelined", type=int, default=0, help="also time N steps back to back, one sync")
    parser.add_argument("--no_eager", action="store_true", help="with --compile: skip the eager PyTorch runners")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--peak", action="store_true", help="measure the bf16 matmul peak; print MFU")
    parser.add_argument("--json", default="", help="append a JSON line of results to this file")
    parser.add_argument("--xla", action="append", default=[], help="'K=V;K2=V2': another segjax runner")
    parser.add_argument(
        "--norm_form",
        action="append",
        default=[],
        choices=norm_forms.FORMS,
        help="another segjax runner: norm_forms.py",
    )
    parser.add_argument("--xla_weight_grads", action="store_true", help="a segjax runner without conv3x3's kernel")
    args = parser.parse_args()
    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # what a PyTorch user on a GPU sets
    bf16 = args.dtype == "bfloat16"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    in_ch = 3 if args.dims == 2 else 1
    spatial = (args.size,) * args.dims
    rng = np.random.default_rng(0)
    image = rng.random((args.batch, *spatial, in_ch), dtype=np.float32)
    label = rng.integers(0, args.classes, (args.batch, *spatial)).astype(np.int32)

    cfg = default_config()
    cfg.model.arch = args.arch
    cfg.model.spatial_dims, cfg.model.depth, cfg.model.base_features = args.dims, args.depth, args.base
    cfg.model.dtype = args.dtype
    if args.arch == "unetpp":
        cfg.model.deep_supervision = True
    if args.arch == "vnet":
        cfg.model.kernel_size = args.kernel

    def twin():
        if args.arch == "unetpp":
            return torch_unetpp(torch, args.dims, args.depth, args.base, in_ch, args.classes)
        if args.arch == "vnet":
            return torch_vnet(torch, args.dims, args.depth, args.base, in_ch, args.classes, args.kernel)
        return torch_unet(torch, args.dims, args.depth, args.base, in_ch, args.classes)

    def torch_loss(out, target):
        if isinstance(out, list):  # deep supervision: equal weights summing to 1, as segjax's default
            return sum(torch.nn.functional.cross_entropy(o, target) for o in out) / len(out)
        return torch.nn.functional.cross_entropy(out, target)

    train, infer, st, batch = segjax_step(cfg, args.classes, image, label)
    variants = {f"segjax + {text}": dict(parse_option(o) for o in text.split(";")) for text in args.xla}
    states = {name: jax.tree.map(jnp.copy, st) for name in variants}  # each runner donates its own
    start = time.perf_counter()
    st, out = train(st, batch)
    jax.block_until_ready(out)
    jax_compile = time.perf_counter() - start
    jax.block_until_ready(infer(st, batch["image"]))
    forward_flops = count_flops(infer, st, batch["image"])
    runners = {"segjax (jax.jit)": jax_runner(train, infer, st, batch)}
    for name, options in variants.items():
        try:
            compiled = train.lower(states[name], batch).compile(compiler_options=options)
        except Exception as err:  # an option this jaxlib does not know: report, go on
            print(f"{name}: failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        runners[name] = jax_runner(compiled, infer, states[name], batch)
    if args.xla_weight_grads:  # the same network without segjax's CPU weight-gradient kernel
        with conv3x3.switched_off():  # traced and compiled here, so the switch applies
            x_train, x_infer, x_st, x_batch = segjax_step(cfg, args.classes, image, label)
            x_train = x_train.lower(x_st, x_batch).compile()
            x_infer = x_infer.lower(x_st, x_batch["image"]).compile()
        runners["segjax, XLA's weight grads"] = jax_runner(x_train, x_infer, x_st, x_batch)
    for form in args.norm_form:  # the same network with batch norm's sums in another form
        with norm_forms.use(form):
            runners[f"segjax + bn {form}"] = jax_runner(*segjax_step(cfg, args.classes, image, label))

    net = twin()
    n_jax, n_torch = state.param_count(st.params), sum(p.numel() for p in net.parameters())
    print(f"params: segjax {n_jax:,}  torch {n_torch:,}")
    assert n_jax == n_torch, "the two networks differ"
    x_t = torch.from_numpy(np.moveaxis(image, -1, 1).copy()).to(device)
    y_t = torch.from_numpy(label.astype(np.int64)).to(device)
    memory_format = torch.channels_last if args.dims == 2 else torch.channels_last_3d

    def torch_runner(module, channels_last):
        module = module.to(device).train()
        x = x_t.contiguous(memory_format=memory_format) if channels_last else x_t
        if channels_last:
            module = module.to(memory_format=memory_format)
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)

        def amp():  # PyTorch's mixed precision: autocast to bf16, parameters and loss in float32
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        def step(wait=True):
            opt.zero_grad(set_to_none=True)
            with amp():
                out = module(x)
            loss = torch_loss([o.float() for o in out] if isinstance(out, list) else out.float(), y_t)
            loss.backward()
            opt.step()
            if wait:
                sync()

        def forward():
            with torch.no_grad(), amp():
                module.eval()
                module(x)
                module.train()
            sync()

        return step, forward, sync

    if not (args.no_eager and args.compile):
        runners["torch eager"] = torch_runner(twin(), False)
        runners["torch eager channels_last"] = torch_runner(twin(), True)
    if args.compile:  # on a GPU compiled with channels_last, the fastest PyTorch layout there
        runners["torch.compile"] = torch_runner(torch.compile(twin()), cuda)
    for name, r in list(runners.items()):  # warm-up (torch.compile's compilation, cuDNN's autotuning)
        t = time.perf_counter()
        try:
            for _ in range(3 if cuda else 1):
                r[0]()
                r[1]()
        except Exception as err:  # an XLA option that compiles but cannot run here: report, go on
            if name not in variants:
                raise
            print(f"{name}: failed: {type(err).__name__}: {str(err)[:200]}")
            del runners[name]
            continue
        print(f"{name}: warm-up {time.perf_counter() - t:.1f} s")
    where = jax.devices()[0].device_kind if cuda else f"CPU, {threads} threads"
    print(
        f"segjax: first step (compile) {jax_compile:.1f} s; {where}; dtype {args.dtype}; "
        f"torch threads: {torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}"
    )

    train_t = {k: [] for k in runners}
    infer_t = {k: [] for k in runners}
    for _ in range(args.steps):
        for name, r in runners.items():
            t = time.perf_counter()
            r[0]()
            train_t[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            r[1]()
            infer_t[name].append(time.perf_counter() - t)
    # Pipelined: `--pipelined N` steps back to back, one sync at the end (3 alternating rounds,
    # median): the rate of a training loop that does not wait for each step, as segjax's (it
    # reads a step's outputs while the next one runs), so host dispatch overlaps device work.
    piped = {k: [] for k in runners}
    for _ in range(3 if args.pipelined else 0):
        for name, r in runners.items():
            t = time.perf_counter()
            for _ in range(args.pipelined):
                r[0](wait=False)
            r[2]()
            piped[name].append((time.perf_counter() - t) / args.pipelined)
    peak = measure_peak() if args.peak else float("nan")
    ours = statistics.median(train_t["segjax (jax.jit)"])
    ours_inf = statistics.median(infer_t["segjax (jax.jit)"])
    print(f"forward FLOPs per batch (convs + matmuls): {forward_flops / 1e9:.1f} G; peak {peak / 1e12:.0f} TFLOP/s")
    print(
        f"\n{'':<28}{'train ms/step':>14}{'ratio':>8}{'train img/s':>12}{'MFU':>7}"
        f"{'forward ms':>12}{'ratio':>8}{'images/s fwd':>14}"
    )
    ratios, rows = {}, {}
    for name in runners:
        tr, inf = statistics.median(train_t[name]), statistics.median(infer_t[name])
        ratios[name] = tr / ours
        mfu = 3 * forward_flops / tr / peak
        rows[name] = {"train_ms": tr * 1000, "train_img_s": args.batch / tr, "mfu": mfu, "forward_ms": inf * 1000}
        print(
            f"{name:<28}{tr * 1000:>14.1f}{tr / ours:>8.2f}{args.batch / tr:>12.1f}{mfu:>7.1%}"
            f"{inf * 1000:>12.1f}{inf / ours_inf:>8.2f}{args.batch / inf:>14.1f}"
        )
    if args.pipelined:
        ours_piped = statistics.median(piped["segjax (jax.jit)"])
        title = f"pipelined ({args.pipelined} steps, one sync)"
        print(f"\n{title:<40}{'train ms/step':>14}{'ratio':>8}{'train img/s':>12}")
        for name, times in piped.items():
            ms = statistics.median(times)
            rows[name]["pipelined_ms"] = ms * 1000
            print(f"{name:<40}{ms * 1000:>14.1f}{ms / ours_piped:>8.2f}{args.batch / ms:>12.1f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "device": where, "peak": peak, "rows": rows}) + "\n")
    fmt = lambda k: f"{ratios[k]:.2f}x" if k in ratios else "n/a"  # noqa: E731
    print(
        f"speedup vs torch eager: {fmt('torch eager')}, vs channels_last: {fmt('torch eager channels_last')}, "
        f"vs torch.compile: {fmt('torch.compile')}"
    )


if __name__ == "__main__":
    main()
