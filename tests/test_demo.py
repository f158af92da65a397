"""The main job end to end: `sparc demo` (with few steps) writes data, three checkpoints and a report."""

from __future__ import annotations

import json

from sparc_core.cli import main


def test_demo_runs_end_to_end_and_reuses_its_artefacts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "30", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "per-sample Jaccard, streams encoded alone" in text and "paper recipe (global, lambda=1)" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"SPARC defaults", "paper recipe (global, lambda=1)", "Local TopK (lambda=0)"}
    for r in report.values():
        assert r["n_samples"] == 5000 and r["gallery"] == 2000
        assert set(r["pairs"]) == {
            f"{a}->{b}" for a in ("dino", "clip_img", "clip_txt") for b in ("dino", "clip_img", "clip_txt") if a != b
        }
    sparc, base = report["SPARC defaults"]["summary"], report["Local TopK (lambda=0)"]["summary"]
    assert sparc["mean_R@1_latent"] > base["mean_R@1_latent"]  # even 30 steps align the streams
    assert (out / "sparc" / "training_curves.png").is_file()
    # it ends with the concept report (latents named after the planted concepts) and prints where it is
    page = (out / "concepts" / "index.html").read_text()
    assert f"concept report (open in a browser): {out / 'concepts' / 'index.html'}" in text
    assert "id='overview'" in page and page.count("class='latent'") >= 20 and "concept-" in page
    assert "named latents:" in text and (out / "sparc" / "latent_names.json").is_file()
    # A second run reuses data and checkpoints instead of training again.
    assert main(["demo", "--out", str(out), "--steps", "30", "--quiet"]) == 0
    assert "reusing trained SPARC defaults" in capsys.readouterr().out


def test_help_and_version_load_no_heavy_library():
    """`sparc --help` (with every plugin command) and `--version` import neither torch, numba nor FAISS."""
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from sparc_core.cli import main\n"
        "for argv in (['--help'], ['--version'], ['index', '--help'], ['serve', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'numba', 'faiss', 'open_clip', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    version = subprocess.run([sys.executable, "-m", "sparc_core.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("sparc 0.") and version.returncode == 0
