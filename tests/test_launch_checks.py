"""Launch safety (issue #7, items 3 and 6): every user mistake is refused before anything is created.

Each bad input runs the CLI as a user does and must give one line `error: KEY=...` on stderr, exit code 2,
no traceback, no Hydra hint, and leave no folder, database or MLflow run behind.
"""
from __future__ import annotations

import pytest

from tests.conftest import TINY, run_cli


def _refused(res, key: str, *words: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, key, words", [
    # a swept key: the grid would silently replace it
    (["sweep=mcm_mask_ratio", "method.mask_ratio=1.2"], "method.mask_ratio",
     ["grid", "sweep.grid={method.mask_ratio:[1.2]}", "sweeps/conf/sweep/"]),
    (["sweep=mcm_mask_ratio", "method=mae"], "method", ["fixes", "sweep.fixed"]),
    (["sweep=mcm_target", "method.target=pixel"], "method.target", ["points", "sweep.points"]),
    (["sweep=mcm_mask_ratio", "seed=3"], "seed", ["sweep.seeds=[3]"]),
    (["sweep=mcm_mask_ratio", "sweep.seeds=[]"], "sweep.seeds", ["non-empty"]),
    # keys that do not exist, with + (Hydra's own suggestion after a typo) and without
    (["sweep=mcm_mask_ratio", "+method.mask_ration=0.5"], "method.mask_ration", ["Did you mean method.mask_ratio?"]),
    (["sweep=mcm_mask_ratio", "method.mask_ration=0.5"], "method.mask_ration", ["Did you mean method.mask_ratio?"]),
    (["sweep=mcm_mask_ratio", "+pretrain.batchsize=8"], "pretrain.batchsize", ["Did you mean pretrain.batch_size?"]),
    (["sweep=mcm_mask_ratio", "+sweep.seed=[1]"], "sweep.seed", ["sweep spec"]),
    # Hydra's own errors, in our style
    (["sweep=mcm_mask_ratio", "method=foo"], "method", ["config group method", "mcm"]),
    (["sweep=nosuchsweep"], "sweep", ["config group sweep", "mcm_mask_ratio"]),
    # values read by nothing, and wrong shapes
    (["sweep=mcm_mask_ratio", "data.root=/tmp"], "data.root", ["data.source=embedded"]),
    (["sweep=mcm_mask_ratio", "data.crop_scale=0.5"], "data.crop_scale", ["[lo, hi]"]),
    (["sweep=mcm_mask_ratio", "pretrain.betas=0.9"], "pretrain.betas", ["beta1, beta2"]),
])
def test_bad_input_is_refused_in_one_line_before_anything(tmp_path, args, key, words):
    out = tmp_path / "out"
    res = run_cli("sweeps/run.py", *args, f"output_root={out}")
    _refused(res, key, *words)
    assert not out.exists()                                        # no folder, no SQLite store, no run


def test_unparsable_override_is_one_line(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "method.mask_ratio=[", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 2 and res.stderr.startswith("error: cannot parse the override 'method.mask_ratio=['")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "HYDRA_FULL_ERROR" not in res.stderr and not (tmp_path / "o").exists()


def test_a_changed_grid_and_added_sweep_points_still_work(tmp_path):
    """What the errors point to works: the grid from the command line, `+sweep.points`, seeds, --help."""
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "sweep.grid={method.mask_ratio:[0.5,0.7]}",
                  "sweep.seeds=[1,2]", "dry_run=true", f"output_root={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert "4 point(s)" in res.stdout and res.stdout.count("seed=2") == 2 and "50%" in res.stdout
    assert not any(tmp_path.iterdir())
    helped = run_cli("sweeps/run.py", "--help")
    assert helped.returncode == 0 and "mcm_mask_ratio" in helped.stdout


def test_offline_pretrained_tag_is_refused_naming_the_key(tmp_path):
    """The CLIP teacher's `openai` tag downloads from the hub: offline (HF_HUB_OFFLINE=1, as on these
    machines, or no network) and not in the local cache, it is refused before any run exists."""
    from core.teachers import pretrained_unavailable
    if pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None:
        pytest.skip("CLIP ViT-B/16 weights are in the local cache here")
    out = tmp_path / "out"
    res = run_cli("sweeps/run.py", "sweep=maskalign_topk", "teacher=clip_vit_b16", *TINY, f"output_root={out}",
                  env={"HF_HUB_OFFLINE": "1"})
    _refused(res, "teacher.pretrained", "'openai'", "local file", "Hugging Face hub")
    assert not out.exists()
    # the same sweep and teacher with weights that need no download pass the checks
    ok = run_cli("sweeps/run.py", "sweep=maskalign_topk", "teacher=clip_vit_b16", "teacher.pretrained=random",
                 *TINY, "dry_run=true", f"output_root={out}")
    assert ok.returncode == 0, ok.stderr


def test_pretrained_lookup_uses_the_libraries_sources(tmp_path, monkeypatch):
    """A tag found in the Hugging Face cache counts as available, with no network at all."""
    import huggingface_hub.constants as hc

    from core.teachers import _weight_sources, pretrained_unavailable
    files, url, _, _ = _weight_sources("open_clip", "ViT-B-16", "openai")
    assert files and files[0][0] == "timm/vit_base_patch16_clip_224.openai" and url.endswith("ViT-B-16.pt")
    repo, name = files[0]
    snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / name).write_bytes(b"weights")
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None
    assert "HF_HUB_OFFLINE" in pretrained_unavailable("timm", "vit_base_patch16_224", "augreg2_in21k_ft_in1k")


def test_pretrained_tag_passes_when_the_hub_answers_and_fails_fast_when_not(monkeypatch):
    """Online (a real listening socket stands in for the hub) the tag passes; a closed port fails at once."""
    import socket
    import time

    import huggingface_hub.constants as hc

    from core.teachers import pretrained_unavailable
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert pretrained_unavailable("open_clip", "ViT-B-16", "openai") is None
    t0 = time.perf_counter()
    problem = pretrained_unavailable("open_clip", "ViT-B-16", "openai", timeout=3)
    took = time.perf_counter() - t0
    print(f"closed hub port: refused in {took:.2f} s")
    assert problem is not None and "cannot be reached" in problem and took < 3.5
