"""Encoder throughput, end to end from image files on disk, and where the time goes.

1. The offline encoder (real shipped weights), on CPU and/or CUDA:
   * ``encode()`` exactly as shipped (sequential image decoding);
   * the same towers fed by the parallel loader (``base.ImageStream``, decoding overlapped
     with the text forward passes): what ``encode()`` gives once it uses that loader;
   * a breakdown: decode (sequential / parallel), tokenize, host tensor prep, host->device
     copy, text model, image model; model FLOPs counted with ``FlopCounterMode`` on one
     batch, achieved TFLOP/s and MFU against the device's peak.
2. A **STAND-IN** for Jina CLIP v2 with *random weights* (architecture-equivalent, not the
   model): EVA02-L/14 at 512 px from timm and an XLM-RoBERTa-large-sized text tower at 128
   tokens, bf16 on CUDA, fp32 on CPU with a tiny N. Its throughput says what the hardware
   does with that architecture; its vectors mean nothing.

Images are generated (smooth colour fields + shapes + mild noise, JPEG and PNG alternating,
256x256) into a temp dir, so decode costs resemble real ad images, not noise or blanks.

    .venv/bin/python benchmarks/encode_throughput.py                     # CPU here
    .venv/bin/python benchmarks/encode_throughput.py --device cuda --n-ads 8192 --batch-size 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adrec_assets.ml.encoders.base import (  # noqa: E402
    ImageStream,
    default_image_workers,
    l2_normalize,
    load_images_parallel,
    try_load_images,
)

TARGETS = (
    "reference targets (issue, NVIDIA H200): STAND-IN image tower >= 40% MFU in bf16 "
    "(~330 images/s); offline encoder >= 2,000 ads/s end to end from files"
)

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor core, fp32 non-tensor).
GPU_PEAKS = {
    "H200": (989.4, 66.9),
    "H100 PCIe": (756.0, 51.2),
    "H100": (989.4, 66.9),  # SXM
    "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6),
    "L4": (121.0, 30.3),
    "A10G": (70.0, 35.0),
    "RTX 4090": (165.2, 82.6),
}

WORDS = (
    "running shoes trail road cushioned grip summit waterproof jacket invest index funds "
    "savings loan travel beach hotel flight deal coffee organic fresh delivery phone "
    "camera battery streaming music concert ticket garden tools kitchen knife yoga mat"
).split()


# --- helpers --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall time of named stages (synchronizing the device around each)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        sync(self.timer.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        sync(self.timer.device)
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + time.perf_counter() - self.start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def cpu_peak_tflops() -> tuple[float | None, str]:
    """Estimated fp32 peak: cores x clock x FLOP/cycle (2 FMA units: AVX-512 64, AVX2 32)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown"
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return None, "unknown"
    flops_per_cycle = 64 if "avx512f" in info else 32 if "avx2" in info else 16
    cores = os.cpu_count() or 1
    peak = cores * max(mhz) * 1e6 * flops_per_cycle / 1e12
    return peak, f"estimate: {cores} cores x {max(mhz) / 1000:.2f} GHz x {flops_per_cycle} FLOP/cycle"


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type == "cpu":
        return cpu_peak_tflops()
    name = torch.cuda.get_device_name(device)
    for key, (half, fp32) in GPU_PEAKS.items():
        if key in name:
            is_half = dtype in (torch.bfloat16, torch.float16)
            return (half if is_half else fp32), f"{key} datasheet, dense {'bf16' if is_half else 'fp32'}"
    return None, f"unknown for {name}: pass --peak-tflops"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (2 per multiply-add). Runs with the MATH attention backend: the
    CPU flash-attention kernel has no formula in FlopCounterMode and would count as 0, the
    math path decomposes into counted matmuls on every device."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def fmt_mfu(tflops: float, peak: float | None) -> str:
    return f"{100 * tflops / peak:.1f}% of {peak:.3g}" if peak else "n/a"


# --- synthetic data -----------------------------------------------------------------------


def _make_image(path: Path, seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([c0 + c1 * x + c2 * y for c0, c1, c2 in rng.uniform(0, 160, (3, 3))], axis=-1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, size // 2, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    if path.suffix == ".jpg":
        img.save(path, quality=90)
    else:
        img.save(path)


def make_dataset(folder: Path, n: int, size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n ads: texts of 4-60 words, one image each (JPEG and PNG alternating)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(4, 60)))) for _ in range(n)]
    paths = [folder / f"ad-{i:06d}.{'jpg' if i % 2 == 0 else 'png'}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=default_image_workers()) as pool:
        list(pool.map(lambda a: _make_image(*a), [(p, seed * 1_000_003 + i, size) for i, p in enumerate(paths)]))
    return texts, [str(p) for p in paths]


# --- offline encoder ------------------------------------------------------------------------


def parallel_encode(enc, texts: list[str], paths: list[str], workers: int, batch_size: int, size: int) -> np.ndarray:
    """OfflineEncoder's towers and fusion, images streamed by ``base.ImageStream`` (decoding
    in threads, overlapped with the text forward passes): ``encode()`` with the parallel loader."""
    with ImageStream(paths, size, workers=workers, prefetch=4 * batch_size) as stream:
        text_vecs = enc.encode_texts(texts)
        image_vecs = np.zeros_like(text_vecs)
        has_image = np.zeros(len(texts), dtype=bool)
        rows, batch = [], []
        for row, image in stream:
            if image is not None:
                rows.append(row)
                batch.append(image)
            if len(batch) == batch_size:
                image_vecs[rows], has_image[rows] = enc.encode_images(batch), True
                rows, batch = [], []
        if batch:
            image_vecs[rows], has_image[rows] = enc.encode_images(batch), True
    return l2_normalize(np.concatenate([text_vecs, image_vecs], axis=1))


def bench_offline(args: argparse.Namespace, device: torch.device, texts: list[str], paths: list[str]) -> dict:
    from adrec_assets.ml.encoders.offline import IMAGE_SIZE, OfflineEncoder

    n = len(texts)
    t0 = time.perf_counter()
    enc = OfflineEncoder(batch_size=args.batch_size, device=str(device))
    load_s = time.perf_counter() - t0
    if args.compile:
        enc.text_model = torch.compile(enc.text_model, dynamic=True)
        enc.image_model.extract_features = torch.compile(enc.image_model.extract_features)
    warm = min(n, 2 * args.batch_size)
    enc.encode(texts[:warm], paths[:warm])  # lazy init, cuDNN autotune, compilation
    print(f"  loaded in {load_s:.1f} s; warm-up on {warm} ads done")

    # (a) encode() exactly as shipped
    timer = Timer(device)
    runs_shipped, runs_parallel = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        res = enc.encode(texts, paths)
        sync(device)
        runs_shipped.append(time.perf_counter() - start)
    e2e = float(np.median(runs_shipped))
    n_img = int(res.has_image.sum())

    # (b) same towers, images streamed by the parallel loader, overlapped with the texts
    workers = args.workers or default_image_workers()
    for _ in range(args.repeat):
        start = time.perf_counter()
        vectors = parallel_encode(enc, texts, paths, workers, args.batch_size, IMAGE_SIZE)
        sync(device)
        runs_parallel.append(time.perf_counter() - start)
    np.testing.assert_allclose(vectors, res.vectors, atol=1e-4, err_msg="parallel path != encode()")
    e2e_par = float(np.median(runs_parallel))

    # (c) breakdown, each stage alone (mirrors OfflineEncoder.encode_texts / encode_images)
    with timer("decode (sequential)"):
        images, _ = try_load_images(paths, IMAGE_SIZE)
    with timer(f"decode (parallel, {workers} threads)"):
        load_images_parallel(paths, IMAGE_SIZE, workers=workers)
    order = np.argsort([len(t) for t in texts], kind="stable")
    token_batches = []
    with timer("tokenize"):
        for start in range(0, n, args.batch_size):
            rows_ = order[start : start + args.batch_size]
            token_batches.append(
                enc.tokenizer(
                    [texts[i] for i in rows_],
                    padding=True,
                    truncation=True,
                    max_length=enc.max_tokens,
                    return_tensors="pt",
                )
            )
    with torch.inference_mode():
        with timer("text: host->device"):
            token_batches = [b.to(device) for b in token_batches]
        with timer("text model"):
            for b in token_batches:
                enc.text_model(**b)
        # FLOPs of one (median-length) batch, scaled by tokens: text cost is ~linear in tokens.
        mid = token_batches[len(token_batches) // 2]
        text_flops_total = (
            count_flops(lambda: enc.text_model(**mid))
            / mid["input_ids"].numel()
            * sum(b["input_ids"].numel() for b in token_batches)
        )
        loaded = [im for im in images if im is not None]
        pixel_batches = []
        with timer("image: host tensor prep"):
            for start in range(0, len(loaded), args.batch_size):
                chunk = loaded[start : start + args.batch_size]
                px = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in chunk]))
                pixel_batches.append(((px - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous())
        with timer("image: host->device"):
            pixel_batches = [p.to(device) for p in pixel_batches]

        def image_forward(p: torch.Tensor) -> torch.Tensor:
            return enc.image_model.extract_features(p).mean(dim=(2, 3)) @ enc.image_projection

        with timer("image model"):
            for p in pixel_batches:
                image_forward(p)
        image_flops_per_image = count_flops(lambda: image_forward(pixel_batches[0][:8])) / len(pixel_batches[0][:8])
        image_flops_total = image_flops_per_image * len(loaded)
    model_s = timer.seconds["text model"] + timer.seconds["image model"]
    achieved = (text_flops_total + image_flops_total) / model_s / 1e12
    peak, peak_src = peak_tflops(device, torch.float32, args.peak_tflops)

    runs = lambda r: ", ".join(f"{x:.2f}" for x in r)  # noqa: E731
    print(
        f"  encode() as shipped:         {n / e2e:8.1f} ads/s {n_img / e2e:8.1f} images/s  "
        f"(median of {args.repeat}: {e2e:.2f} s for {n} ads; runs {runs(runs_shipped)} s)"
    )
    print(
        f"  parallel decode, overlapped: {n / e2e_par:8.1f} ads/s {n_img / e2e_par:8.1f} images/s  "
        f"(median {e2e_par:.2f} s; runs {runs(runs_parallel)} s)"
    )
    print("  breakdown (each stage run alone, seconds for all ads):")
    for name, sec in timer.seconds.items():
        if not name.startswith("e2e"):
            print(f"    {name:<34} {sec:8.3f} s")
    print(
        f"  model FLOPs: text {text_flops_total / n / 1e9:.2f} GFLOP/ad, "
        f"image {image_flops_per_image / 1e9:.2f} GFLOP/image (FlopCounterMode, one batch)"
    )
    print(f"  achieved {achieved:.3f} TFLOP/s in the models (fp32); MFU {fmt_mfu(achieved, peak)} TFLOP/s ({peak_src})")
    return {
        "ads_s": n / e2e,
        "images_s": n_img / e2e,
        "ads_s_parallel": n / e2e_par,
        "images_s_parallel": n_img / e2e_par,
        "tflops": achieved,
        "peak": peak,
        "breakdown": {k: v for k, v in timer.seconds.items() if not k.startswith("e2e")},
    }


# --- STAND-IN for Jina CLIP v2 (random weights) ---------------------------------------------


def _run_tower(
    name: str,
    model: torch.nn.Module,
    make_batch: Callable[[int], object],
    call: Callable,
    n: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    unit: str,
) -> dict:
    if args.compile:
        model = torch.compile(model)
    with torch.inference_mode():
        small = make_batch(min(batch, 2))  # counting pass (math attention): keep it small
        flops_item = count_flops(lambda: call(model, small)) / min(batch, 2)
        if device.type == "cuda" or args.compile:
            call(model, make_batch(batch))  # warm-up: kernels, autotuning, compilation
        batches = [make_batch(min(batch, n - s)) for s in range(0, n, batch)]
        sync(device)
        start = time.perf_counter()
        for b in batches:
            call(model, b)
        sync(device)
        seconds = time.perf_counter() - start
    rate = n / seconds
    tflops = flops_item * n / seconds / 1e12
    peak, peak_src = peak_tflops(device, dtype, args.peak_tflops)
    print(
        f"  STAND-IN {name}: {rate:8.2f} {unit}/s  {flops_item / 1e9:8.1f} GFLOP/{unit[:-1]}  "
        f"{tflops:.3f} TFLOP/s  MFU {fmt_mfu(tflops, peak)} ({peak_src}); n={n}, batch={batch}, {dtype}"
    )
    return {"rate": rate, "tflops": tflops, "peak": peak, "n": n, "batch": batch}


def bench_standin(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict = {}
    n_img = args.standin_n or (512 if device.type == "cuda" else 2)
    n_txt = args.standin_n or (2048 if device.type == "cuda" else 8)
    b_img = min(args.standin_batch or (64 if device.type == "cuda" else 1), n_img)
    b_txt = min(args.standin_batch or (256 if device.type == "cuda" else 4), n_txt)

    try:
        import timm
    except ImportError:
        print("  STAND-IN image tower (EVA02-L/14 @ 512 px): skipped: pip install -e '.[jina]' (timm)")
    else:
        candidates = ["eva02_large_patch14_clip_224", "eva02_large_patch14_clip_336", "eva02_large_patch14_448"]
        arch = next((c for c in candidates if c in timm.list_models(c)), None)
        if arch is None:
            print(f"  STAND-IN image tower: skipped: none of {candidates} in timm {timm.__version__}")
        else:
            model = timm.create_model(arch, pretrained=False, img_size=512, num_classes=1024)
            model = model.to(device=device, dtype=dtype).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"  STAND-IN image tower: timm {arch}, img_size=512, random weights, {params:.0f} M params")
            out["image"] = _run_tower(
                "image tower (EVA02-L/14 @ 512)",
                model,
                lambda b: torch.randn(b, 3, 512, 512, device=device, dtype=dtype),
                lambda m, x: m(x),
                n_img,
                b_img,
                device,
                dtype,
                args,
                "images",
            )
            del model

    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
    )
    model = XLMRobertaModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"  STAND-IN text tower: XLM-RoBERTa-large shape (24 x 1024, 16 heads), random weights, "
        f"{params:.0f} M params, 128 tokens"
    )
    gen = torch.Generator().manual_seed(0)
    out["text"] = _run_tower(
        "text tower (XLM-R-large @ 128 tok)",
        model,
        lambda b: torch.randint(5, 250000, (b, 128), generator=gen).to(device),
        lambda m, ids: m(input_ids=ids).last_hidden_state.mean(1),
        n_txt,
        b_txt,
        device,
        dtype,
        args,
        "texts",
    )
    return out


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present, and CPU too), cpu, cuda, or both")
    p.add_argument("--n-ads", type=int, default=None, help="ads (one image each); default 256 CPU / 8192 CUDA")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256, help="side of the generated images")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: cores, max 8)")
    p.add_argument("--repeat", type=int, default=3, help="end-to-end runs per variant (median reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--skip-standin", action="store_true", help="skip the Jina CLIP v2 STAND-IN")
    p.add_argument("--standin-n", type=int, default=None, help="STAND-IN inputs per tower (default 2/8 CPU)")
    p.add_argument("--standin-batch", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, overriding the table")
    args = p.parse_args(argv)

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "both":
        devices = ["cpu", "cuda"]
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device visible to torch {torch.__version__}", file=sys.stderr)
        return 2
    print(
        f"encode_throughput  {dt.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
        f"python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(TARGETS)
    if "cuda" not in devices or not torch.cuda.is_available():
        print("no CUDA device in this run: GPU figures still to be measured")

    with tempfile.TemporaryDirectory(prefix="adrec-bench-") as tmp:
        for name in devices:
            device = torch.device(name)
            n = args.n_ads or (8192 if device.type == "cuda" else 256)
            t0 = time.perf_counter()
            texts, paths = make_dataset(Path(tmp) / name, n, args.image_size)
            print(f"\n[{name}] {device_name(device)}")
            print(
                f"  {n} ads, {n} images ({args.image_size}x{args.image_size}, JPEG/PNG) generated in "
                f"{time.perf_counter() - t0:.1f} s; batch {args.batch_size}"
            )
            print("offline encoder (all-MiniLM-L6-v2 + EfficientNet-Lite0, real weights, fp32):")
            bench_offline(args, device, texts, paths)
            if not args.skip_standin:
                print("Jina CLIP v2 STAND-IN (architecture-equivalent, RANDOM weights, not the model):")
                bench_standin(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
