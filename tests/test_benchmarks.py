"""The benchmark scripts run end to end in --smoke mode (real embedded models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *(args or ("--smoke",))],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def parse_table(out: str) -> list[dict[str, str]]:
    """The markdown table printed by a benchmark → one dict per row."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, out
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[0])
    assert set(lines[1]) <= {"|", "-"}, lines[1]
    rows = [dict(zip(header, cells(ln), strict=True)) for ln in lines[2:]]
    return rows


def check_rows(rows: list[dict[str, str]], methods: tuple[str, ...], rate: str, n_images: int) -> None:
    assert [r["method"] for r in rows] == list(methods)
    for r in rows:
        assert int(r["images"]) == n_images
        secs, per_s, peak = float(r["seconds"]), float(r[rate]), float(r["peak RSS MB"])
        assert secs > 0 and per_s > 0
        # seconds are printed with 2 decimals: allow that rounding (large on a fast CPU) on top of 2%
        assert per_s == pytest.approx(n_images / secs, rel=0.02 + 0.005 / secs, abs=2e-3)
        assert 100 < peak < 64_000
        assert float(r["RSS ready MB"]) <= peak


def test_bench_attribution_smoke():
    out = run_script("bench_attribution.py")
    rows = parse_table(out)
    check_rows(rows, ("one-pass", "streaming", "naive"), "images/s", 2)
    assert [int(r["batch"]) for r in rows] == [2, 2, 1]
    assert "torch" in out and "torch threads = 2" in out
    assert "speed ratio" in out
    assert out.count("0 of 2 differ beyond float noise (tol 0.001)") == 2  # streaming and naive
    # one-pass and streaming run the same batches: exactly the same top-k, as before the tolerance
    assert "one-pass vs streaming: 0 of 2 images with different top-k" in out
    assert "same top-k: yes" in out.splitlines()


def test_topk_agree_hand_cases():
    """Near-ties may reorder or swap at the cut; anything larger than the tolerance may not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_common", REPO / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    topk_agree = common.topk_agree

    a = [((0, 1), 10.0), ((0, 2), 5.0), ((1, 3), 4.0)]
    assert topk_agree(a, a, 1e-3)
    tie = [((0, 1), 10.0), ((0, 2), 4.0005), ((1, 3), 4.0)]
    assert topk_agree(tie, [((0, 1), 10.0), ((1, 3), 4.0004), ((0, 2), 4.0001)], 1e-3)  # near-tie reordered
    assert not topk_agree(a, [((0, 1), 10.0), ((0, 2), 5.0), ((1, 3), 3.9)], 1e-3)  # moved by 1e-2 of max
    # swap at the cut: (1, 3) out, (2, 0) in, both within 1e-3 * 10 of the other list's 3rd value
    assert topk_agree(a, [((0, 1), 10.0), ((0, 2), 5.0), ((2, 0), 3.995)], 1e-3)
    # a key only one list keeps, far above the other list's cut: a real difference
    assert not topk_agree(a, [((0, 1), 10.0), ((2, 0), 6.0), ((0, 2), 5.0)], 1e-3)


def test_bench_caption_smoke():
    out = run_script("bench_caption.py")
    rows = parse_table(out)
    check_rows(rows, ("batched", "one-by-one"), "captions/s", 4)
    assert int(rows[0]["batch"]) == 4 and int(rows[1]["batch"]) == 1
    assert rows[0]["caption tokens"] == rows[1]["caption tokens"]
    assert "torch threads = 2" in out
    assert "same captions: yes" in out.splitlines()


def test_bench_ablate_smoke():
    """2 images, ks 0,100,1600: one 3-row forward per image vs 3 one-row forwards, same p(c)."""
    out = run_script("bench_ablate.py")
    rows = parse_table(out)
    check_rows(rows, ("batched", "per-k"), "images/s", 2)
    assert [int(r["rows"]) for r in rows] == [3, 1]
    assert [int(r["forwards"]) for r in rows] == [2, 6]  # one per image vs one per (image, k)
    for r in rows:
        assert 0 < float(r["ablation s"]) <= float(r["seconds"])
    assert "torch threads = 2" in out
    assert "speed ratio" in out
    # the same ranking code on the same image in two processes: identical (mmn.numerics), not just close
    assert "unit rankings: 2 of 2 images identical, 0 differ beyond float noise" in out
    assert "same p(c): yes" in out.splitlines()


def test_bench_memory_smoke():
    """Counts 2 and 4, each in its own process: one row per count, growth = peak - ready."""
    out = run_script("bench_memory.py")
    rows = parse_table(out)
    assert [int(r["images"]) for r in rows] == [2, 4]
    growth = {}
    for r in rows:
        n = int(r["images"])
        ready, peak, g = float(r["RSS ready MB"]), float(r["peak RSS MB"]), float(r["growth MB"])
        assert 100 < ready <= peak < 64_000
        assert int(r["batch"]) == 2 and int(r["rows kept"]) == 100 * n  # k = 100 rows per image
        assert g == pytest.approx(peak - ready, abs=0.15)  # each printed with one decimal
        assert float(r["growth per image KB"]) == pytest.approx(g * 1024 / n, abs=0.05 * 1024 / n + 0.5)
        assert float(r["images/s"]) == pytest.approx(n / float(r["seconds"]), rel=0.02, abs=2e-3)
        growth[n] = g
    line = next(ln for ln in out.splitlines() if ln.startswith("growth ratio (4 vs 2 images"))
    if growth[2] > 0:
        ratio = float(line.split(": ")[1].split("x")[0])
        assert ratio == pytest.approx(growth[4] / growth[2], rel=0.01, abs=0.01)
    # flat, loosely (RSS is noisy): twice the images must not come near twice the growth
    assert growth[4] < 1.5 * growth[2] + 100
    assert "torch threads = 2" in out


def vml_replay_verdict(out: str, cpu: str) -> None:
    """Check vml_race_replay.py's output. Everywhere: the HA replay is bit-identical to the normal
    forward (the harness replays ATen's own call). Only where this CPU's EP kernel differs from
    HA (the premise; on e.g. AMD EPYC with avx512_bf16 it does not): every EP row moves the logit,
    by float noise only. Without the premise the rest is skipped, naming the CPU."""
    rows = parse_table(out)
    assert len(rows) == 9 and rows[0]["rotary op"] == "(normal forward)"
    base = float(rows[0]["max logit (image 0, last position)"])
    ep = {}
    for r in rows[1:]:
        v = float(r["max logit (image 0, last position)"])
        if r["VML kernel"] == "HA":
            assert v == base, r
        else:
            ep[(r["rotary op"], r["thread's half"])] = v
    assert "HA replay bit-identical to the normal forward: yes" in out
    moved = {k: v for k, v in ep.items() if v != base}
    assert f"EP replay moves the logits on this CPU: {'yes' if moved else 'no'}" in out
    if not moved:
        pytest.skip(f"MKL's EP kernel gives the same bits as HA for these inputs on this CPU ({cpu}): "
                    f"the race's effect cannot be replayed here; the HA identity was checked")
    # the premise is "EP differs from HA here", at least for one half; which halves it moves is
    # itself CPU-dependent (all four on the Intel Xeon where the race was found), so not asserted
    assert len(ep) == 4 and all(abs(v - base) < 0.01 for v in ep.values()), ep


def test_vml_race_replay():
    """The race's replay (benchmarks/vml_race_replay.py), with its CPU-dependent part explicit.
    MMN_VML_EP_KERNEL=HA forces the premise off (the "EP" rows then use HA): the test skips."""
    from mmn.provenance import describe, environment

    out = run_script("vml_race_replay.py", "--check", "--ep-kernel", os.environ.get("MMN_VML_EP_KERNEL", "EP"))
    import torch

    if not torch.backends.mkl.is_available():  # the replay calls MKL's VML inside libtorch_cpu
        pytest.skip(f"this torch build has no MKL ({describe(environment())}): nothing to replay")
    forced = " [forced: MMN_VML_EP_KERNEL=HA]" if os.environ.get("MMN_VML_EP_KERNEL") == "HA" else ""
    vml_replay_verdict(out, describe(environment()) + forced)


def test_vml_replay_verdict_both_paths():
    """Both branches of the verdict on hand-made tables: premise present (EP moves, passes; EP
    moving too far fails) and absent (EP == HA everywhere: a skip that names the CPU)."""
    def table(ep: float, ha: float = 27.5) -> str:
        rows = [f"| {fn} | {t} | {k} | {ha if k == 'HA' else ep:.7f} | |"
                for fn in ("cos", "sin") for t in (0, 1) for k in ("HA", "EP")]
        return "\n".join(["| rotary op | thread's half | VML kernel | max logit (image 0, last position) | vs normal |",
                          "|---|---|---|---|---|", "| (normal forward) | | | 27.5000000 | |", *rows,
                          "HA replay bit-identical to the normal forward: yes",
                          f"EP replay moves the logits on this CPU: {'no' if ep == ha else 'yes'}"])
    vml_replay_verdict(table(27.4998), "cpu X")
    with pytest.raises(AssertionError):
        vml_replay_verdict(table(27.6), "cpu X")
    with pytest.raises(pytest.skip.Exception, match=r"on this CPU \(cpu X\)"):
        vml_replay_verdict(table(27.5), "cpu X")
    vml_replay_verdict(table(27.5).replace("| cos | 0 | EP | 27.5000000", "| cos | 0 | EP | 27.4990000")
                       .replace("moves the logits on this CPU: no", "moves the logits on this CPU: yes"), "cpu X")
    with pytest.raises(AssertionError):  # the HA identity holds wherever MKL is: never skipped
        vml_replay_verdict(table(27.5, ha=27.4), "cpu X")


def test_bench_paper_gpu_smoke():
    """The paper-shaped GPU benchmark runs every stage in --smoke mode on the CPU (tiny shapes):
    one row per stage with images/s = images / seconds and t(n) = n / rate, the three memory
    sizes, and the whole-DAG line equal to n · Σ 1/rate + decode, recomputed from the rows."""
    out = run_script("bench_paper_gpu.py", "--smoke")
    assert "tiny shapes: not a GPU figure" in out and "FAILED" not in out, out
    assert "LM attention implementation:" in out
    rows = {}
    for ln in out.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if not ln.startswith("| ") or cells[0] == "stage":
            continue
        n, secs, ips, t1000, t5000 = int(cells[1]), float(cells[2]), cells[3], float(cells[7]), float(cells[8])
        rows[cells[0]] = (n, secs, None if ips == "-" else float(ips), t1000, t5000)
    stages = ["caption (batched greedy, KV cache)", "attribute", "decode (all units, top 10)",
              "score (Table 1 + Table 2, BERTScore + CLIP)", "iou (activations + receptive fields)",
              "ablate (9 ks x 3 kinds, regenerate)", "attribute, 2 images", "attribute, 4 images",
              "attribute, 8 images"]
    assert all(s in rows for s in stages), sorted(rows)
    assert any(k.startswith("attribution core") for k in rows)
    per_image = 0.0
    for name, (n, secs, ips, t1000, t5000) in rows.items():
        if ips is None:
            continue
        assert ips == pytest.approx(n / secs, rel=0.05 + 0.01 / secs)
        # ips is printed to 2 decimals, t1000 from the unrounded rate: allow the rounding (0.005/ips)
        assert t1000 == pytest.approx(1000 / ips, rel=0.01 + 0.005 / ips, abs=0.06)
        assert t5000 == pytest.approx(5 * t1000, rel=0.01, abs=0.3)
        if name in stages[:6]:
            per_image += 1 / ips
    line = next(ln for ln in out.splitlines() if ln.startswith("== whole DAG"))
    slope = float(line.split("= n * ")[2].split(" s")[0])
    assert slope == pytest.approx(per_image, rel=0.02)
