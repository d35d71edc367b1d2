"""Config validation, signatures and grid expansion: what a user relies on before any job runs."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from core.config import ConfigError, flatten, signature
from core.job import validate
from sweeps.grid import expand
from tests.conftest import REPO, run_cli


@pytest.mark.parametrize("override, key", [
    ("method.mask_ratio=1.5", "method.mask_ratio"),
    ("method.mask_ratio=0", "method.mask_ratio"),
    ("method.decoder_depth=0", "method.decoder_depth"),
    ("method.masking=stripes", "method.masking"),
    ("method.recon_range=some", "method.recon_range"),
    ("method.target=depth", "method.target"),
    ("model.num_heads=3", "model.embed_dim"),
    ("model.input_size=30", "model.input_size"),
    ("pretrain.batch_size=0", "pretrain.batch_size"),
    ("pretrain.precision=fp8", "pretrain.precision"),
    ("pretrain.compile=maybe", "pretrain.compile"),
    ("pretrain.compile=1", "pretrain.compile"),
    ("pretrain.warmup_epochs=100", "pretrain.warmup_epochs"),
    ("teacher.feature_stage=9", "teacher.feature_stage"),
    ("teacher.pretrained=/no/such/file.pt", "teacher.pretrained"),
    ("evaluate.pool=max", "evaluate.pool"),
    ("data.crop_scale=[0.9,0.2]", "data.crop_scale"),
    ("data.crop_scale=0.5", "data.crop_scale"),
    ("pretrain.betas=0.9", "pretrain.betas"),
    ("method.target_norm=rms", "method.target_norm"),
    ("task=finetune", "task"),
])
def test_bad_values_name_their_key(compose, override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose(override))
    assert err.value.key == key
    assert key in str(err.value)


def test_teacher_width_must_be_known(compose):
    with pytest.raises(ConfigError, match="teacher.model"):
        validate(compose("teacher=clip_vit_b16", "teacher.model=ViT-Q-99"))
    with pytest.raises(ConfigError, match="not a pretrained tag"):
        validate(compose("teacher=clip_vit_b16", "teacher.pretrained=nonsense"))


@pytest.mark.parametrize("override, key", [
    ("method.num_proxies=-1", "method.num_proxies"),
    ("method.hog_cell_size=3", "method.hog_cell_size"),
    ("method.tokenizer.kind=vqgan", "method.tokenizer.kind"),
    ("method.tokenizer.kind=dalle", "method.tokenizer.path"),
    ("method.mask_ratio=0.999", "method.mask_ratio"),
])
def test_semanticmim_values_name_their_key(compose, override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose("method=semanticmim", "method.target=tokens" if "tokenizer" in override else "task=train",
                         override))
    assert err.value.key == key


def test_every_shipped_config_combination_validates(compose):
    from core.config import CONFIG_DIR
    for method in sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")):
        for model in ("vit_micro", "vit_tiny", "vit_small", "vit_base"):
            validate(compose(f"method={method}", f"model={model}"))
    from core.targets.teachers import pretrained_unavailable
    for teacher in ("efficientnet_lite0", "clip_vit_b16", "clip_vit_l14"):
        cfg = compose(f"teacher={teacher}")
        if cfg.teacher.kind == "open_clip" and pretrained_unavailable("open_clip", cfg.teacher.model, "openai"):
            with pytest.raises(ConfigError, match="^teacher.pretrained='openai' is invalid: cannot be loaded offline"):
                validate(cfg)                          # offline, and not in the cache: refused up front
            cfg = compose(f"teacher={teacher}", "teacher.pretrained=random")
        validate(cfg)


def test_signature_ignores_where_and_how_but_not_what(compose):
    base = signature(compose())
    assert signature(compose()) == base
    for run_only in ("tracking.uri=http://elsewhere:5000", "output_root=/scratch/x", "pretrain.checkpoint_every=7",
                     "device=cpu", "data.num_workers=4", "dry_run=true", "pretrain.compile=true"):
        assert signature(compose(run_only)) == base, run_only
    for science in ("method.mask_ratio=0.6", "seed=1", "model.depth=6", "pretrain.epochs=5", "teacher.input_size=64"):
        assert signature(compose(science)) != base, science


def test_signature_is_stable_across_processes(compose):
    code = ("import sys; sys.path.insert(0, '.');"
            "from hydra import initialize_config_dir, compose;"
            "from core.config import CONFIG_DIR, SEARCHPATH, signature;"
            "initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3');"
            "print(signature(compose('config', overrides=[SEARCHPATH, 'method.mask_ratio=0.6'])))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == signature(compose("method.mask_ratio=0.6"))


def test_params_use_the_config_key_names(compose):
    flat = flatten(compose())
    assert flat["method.mask_ratio"] == 0.75 and flat["model.embed_dim"] == 128 and "pretrain.base_lr" in flat


def test_grid_and_points_expand_with_seeds():
    spec = {"name": "s", "fixed": ["method=mcm"], "grid": {"method.mask_ratio": [0.6, 0.75]}, "seeds": [0, 1],
            "report": {"row_format": "percent"}}
    pts = expand(spec)
    assert [(p.label, p.seed) for p in pts] == [("60%", 0), ("60%", 1), ("75%", 0), ("75%", 1)]
    assert pts[1].overrides == ["method=mcm", "method.mask_ratio=0.6", "seed=1"]
    spec = {"name": "t", "points": [{"label": "a", "overrides": ["method=mae"]}, {"label": "b", "overrides": []}]}
    assert [p.label for p in expand(spec)] == ["a", "b"]
    with pytest.raises(ValueError, match="neither"):
        expand({"name": "u"})


def test_every_sweep_spec_expands_and_validates(compose):
    from sweeps.plan import compose_point
    for spec_file in sorted((REPO / "sweeps" / "conf" / "sweep").glob("*.yaml")):
        cfg = compose(f"sweep={spec_file.stem}")
        points = expand(cfg.sweep)
        assert points, spec_file.name
        labels = {p.label for p in points}
        ref_rows = set(cfg.sweep.report.reference.rows)
        # every paper row sits beside one of ours (a typo would silently drop the paper's number), except
        # where the paper's settings are not ours by design: paper epochs, or teachers that need a hub
        if spec_file.stem not in ("mcm_epochs", "maskalign_teacher"):
            assert ref_rows <= labels, (spec_file.name, ref_rows - labels)
        assert cfg.sweep.report.default in labels, spec_file.name
        cache = {}
        for p in points:
            fast = compose_point(["preset=smoke", "model.depth=3"], p, cache)
            validate(fast)
            full = compose("preset=smoke", "model.depth=3", *p.overrides)   # one full Hydra compose
            assert OmegaConf.to_container(fast) == OmegaConf.to_container(full), (spec_file.name, p.label)


@pytest.mark.parametrize("overrides", [
    ["model.embed_dim=64", "model.num_heads=4"],                 # what mcm's decoder_dim/heads interpolate
    ["evaluate.layer=1", "evaluate.pool=cls"],                   # interpolations inside lists
    ["evaluate.linear.layers=[0,-1]"],                          # a list with interpolations replaced
    ["method.decoder_dim=${model.depth}", "model.depth=3"],     # an override that is itself an interpolation
    ["~method.decoder_heads"],                                  # an interpolation deleted
    ["evaluate.protocols=[knn]", "~evaluate.linear"],           # the container of interpolations deleted
    ["evaluate.protocols=[knn]", "~evaluate.linear.pools"],
    ["evaluate.linear.layers=null"],
])
def test_a_point_resolves_its_interpolations_as_a_full_compose(compose, overrides):
    """compose_point resolves only where the composed config has interpolations (and a plain `${a.b}` by a
    lookup): the values it gives are those of Hydra's full compose + OmegaConf.resolve."""
    from sweeps.grid import Point
    from sweeps.plan import compose_point
    point = Point(label="p", seed=0, overrides=["method=mcm", *overrides])
    fast = compose_point(["preset=smoke"], point, {})
    full = compose("preset=smoke", "method=mcm", *overrides)
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(full)
    assert fast.method.get("decoder_dim") == full.method.get("decoder_dim")
    assert fast.evaluate.get("linear") == full.evaluate.get("linear")


def test_a_plan_without_checks_learns_from_its_runs_which_points_use_a_teacher(compose):
    """status.py and reports/build.py plan without checks (no method imported, no torch): a point's teacher use
    is then what the run it matched was signed with, the same as the method says."""
    from types import SimpleNamespace

    from sweeps.plan import match, matchable, plan
    overrides = ["sweep=mcm_target", "preset=smoke"]
    checked = plan(compose(*overrides), overrides)[1]
    unchecked = plan(compose(*overrides), overrides, check=False)[1]
    assert [pl.uses_teacher for pl in checked] == [False, False, True, True]     # pixel, pixel, teacher, teacher
    assert all(pl.uses_teacher is None for pl in unchecked)
    runs = [SimpleNamespace(data=SimpleNamespace(tags={"mimsweep.kind": "point", "mimsweep.pretrain_signature":
                                                       pl.signature, "mimsweep.eval_signature": pl.eval_sig}))
            for pl in checked]
    can = matchable(unchecked)  # match()'s rule, as the report's read asks it of each run's tags
    assert all(can(r.data.tags) for r in runs)
    assert not can({**runs[0].data.tags, "mimsweep.eval_signature": "other"})
    assert can({"mimsweep.signature": unchecked[1].legacy_sig}) and not can({"mimsweep.signature": "old"})
    found = match(unchecked, runs)
    assert len(found) == 4
    assert [pl.uses_teacher for pl in unchecked] == [False, False, True, True]
    assert [pl.signature for pl in unchecked] == [pl.signature for pl in checked]


def test_cli_reports_a_bad_value_without_traceback(tmp_path):
    res = run_cli("sweeps/run.py", "sweep=mcm_mask_ratio", "method.decoder_depth=0", f"output_root={tmp_path}")
    assert res.returncode == 2
    assert "method.decoder_depth=0 is invalid" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "mlflow.db").exists()   # nothing was created before the error


def test_cli_help_lists_the_sweeps():
    res = run_cli("sweeps/run.py", "--help")
    assert res.returncode == 0
    assert "mcm_mask_ratio" in res.stdout and "mcm_recon_range" in res.stdout


@pytest.mark.parametrize("preset", [None, "paper"])
def test_the_fast_yaml_is_omegaconfs_yaml_for_every_sweep(compose, preset):
    """core.config.to_yaml (libyaml's emitter) writes what OmegaConf.to_yaml writes, byte for byte, for the
    default row of every sweep; strings that read as numbers or bools stay quoted and read back as strings."""
    from core.config import to_yaml
    sweeps = sorted(p.stem for p in (REPO / "sweeps" / "conf" / "sweep").glob("*.yaml"))
    assert len(sweeps) >= 17
    for name in sweeps:
        cfg = compose(f"sweep={name}", *([f"preset={preset}"] if preset else []))
        assert to_yaml(cfg) == OmegaConf.to_yaml(cfg, resolve=True), name
    tricky = OmegaConf.create({"a": "1e-3", "b": "true", "c": "10", "d": "null", "e": "x: y", "f": "ü", "g": [1, "2"]})
    text = to_yaml(tricky)
    assert text == OmegaConf.to_yaml(tricky, resolve=True)
    assert OmegaConf.to_container(OmegaConf.create(text)) == OmegaConf.to_container(tricky)
