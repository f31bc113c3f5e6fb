"""scripts/bench_serving.py end to end on a tiny sweep against the session's server: every cell, the serving
overhead against the same graph in-process, the targets, the JSON and the plots. Its figures are not judged here
(time limits belong in benchmarks, not in tests)."""

from __future__ import annotations

import json
import sys

from conftest import ROOT


def test_bench_serving_writes_its_figures(triton, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_serving
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"scores": [  # the quality harness's record, in brief
        {"task": task, "setting": s, "mode": m, "threshold": t, "steps": k, "accuracy": 1.0,
         "tokens_per_forward": f, "hallucination_rate": None, "seconds": 1.0}
        for task in ("addition", "upper")
        for s, m, t, k, f in [("ar", "ar", None, None, 1.0), ("diffusion t=0.9", "diffusion", 0.9, None, 12.0),
                              ("diffusion steps=2", "diffusion", None, 2, 7.0)]
    ]}))
    out = tmp_path / "bench"
    bench_serving.main(["--url", triton.grpc_url, "--concurrency", "1", "2", "--modes", "ar", "diffusion",
                        "--requests", "2", "--overhead-requests", "2", "--problems", "4", "--quality", str(quality),
                        "--out", str(out)])
    record = json.loads((out / "bench_serving.json").read_text())
    cells = {(c["mode"], c["concurrency"]): c for c in record["cells"]}
    assert set(cells) == {("ar", 1), ("ar", 2), ("diffusion", 1), ("diffusion", 2)}
    assert all(c["accuracy"] == 1.0 and c["tokens_per_s"] > 0 for c in cells.values())
    assert cells[("diffusion", 1)]["tokens_per_forward"] > 3 > cells[("ar", 1)]["tokens_per_forward"]
    assert cells[("ar", 2)]["vs_ar"] == 1.0
    assert set(record["overhead"]) == {"ar", "diffusion"}
    assert all(o["same_text_and_passes"] == 1.0 and o["ratio"] > 0 for o in record["overhead"].values())
    assert any(t["target"].startswith("diffusion tokens/s ÷ ar") for t in record["targets"])
    assert record["machine"]["cores"] and (out / "serving.png").stat().st_size and (out / "quality.png").stat().st_size
