"""preset=paper trains each method with its official recipe: the recipe files (sweeps/conf/recipe/paper_<method>.yaml)
hold every value beside its source, and every point of every sweep resolves to its method's recipe, key by key."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from core.config import CONFIG_DIR, ConfigError, flatten
from sweeps.grid import expand
from sweeps.plan import compose_point, merge_overrides, override_key
from tests.conftest import run_cli

RECIPES = CONFIG_DIR / "recipe"
SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))


def recipe_data(name: str) -> dict:
    """A recipe file as data (its `defaults` merged in): {'pretrain.epochs': 300, ..., 'recipe.name': ...}."""
    node = OmegaConf.load(RECIPES / f"{name}.yaml")
    merged = OmegaConf.create()
    for parent in [d for d in node.pop("defaults", []) if d != "_self_"]:
        merged = OmegaConf.merge(merged, OmegaConf.create(recipe_data(parent)))
    return flatten(OmegaConf.merge(merged, node))


def values_and_sources(name: str) -> tuple[dict, dict]:
    flat = recipe_data(name)
    values = {k: v for k, v in flat.items() if not k.startswith("recipe.")}
    sources = {k[len("recipe.sources."):]: v for k, v in flat.items() if k.startswith("recipe.sources.")}
    return values, sources


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_value_has_a_source(name):
    values, sources = values_and_sources(name)
    assert values and recipe_data(name)["recipe.name"]
    assert set(values) == set(sources), (set(values) ^ set(sources))
    assert all(isinstance(s, str) and len(s) > 10 for s in sources.values())


def method_choice(sweep: str, point_overrides: list[str]) -> str:
    """The `method` group choice of a point: its own or its sweep's `fixed` override, else the sweep file's
    default (its defaults list), else config.yaml's."""
    chosen = [o.split("=", 1)[1] for o in point_overrides if override_key(o) == "method"]
    if chosen:
        return chosen[-1]
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "sweep" / f"{sweep}.yaml"))
    for d in spec.get("defaults", []):
        for key, value in (d.items() if isinstance(d, dict) else []):
            if "/method" in key:
                return value
    return "mcm"


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_point_resolves_to_its_methods_recipe(compose, sweep):
    cfg = compose(f"sweep={sweep}", "preset=paper")
    cache = {}
    for point in expand(cfg.sweep):
        merged = merge_overrides([f"sweep={sweep}", "preset=paper"], point.overrides)
        got = compose_point([f"sweep={sweep}", "preset=paper"], point, cache)
        name = f"paper_{method_choice(sweep, point.overrides)}"
        values, _ = values_and_sources(name)
        assert got.recipe.name == recipe_data(name)["recipe.name"], (sweep, point.label)
        overridden = {override_key(o) for o in merged}
        resolved = flatten(got)
        checked = 0
        for key, value in values.items():
            if key in overridden:       # the point sets it on purpose (a swept mask ratio, one epoch to time it)
                continue
            assert resolved[key] == value, (sweep, point.label, key, resolved[key], value)
            checked += 1
        assert checked >= 30, (sweep, point.label, checked)   # not vacuous: most keys are checked


def test_shared_paper_setting_and_no_recipe_outside_preset_paper(compose):
    cfg = compose("preset=paper", "method=beit")
    assert (cfg.model.name, cfg.data.name, cfg.teacher.model, cfg.pretrain.precision) == \
        ("vit_base", "imagenet", "ViT-B-16", "bf16")
    assert cfg.recipe.name.startswith("SemanticMIM, BEiT variant")
    assert "recipe" not in compose() and "recipe" not in compose("preset=smoke", "method=beit")
    # a command-line value still wins over the recipe's
    assert compose("preset=paper", "method=beit", "pretrain.epochs=800").pretrain.epochs == 800


def test_a_method_without_a_recipe_is_refused_under_preset_paper(compose):
    from core.job import validate
    cfg = compose("preset=paper", "method=mae")
    cfg.recipe.name = None            # what preset=paper leaves when no recipe file matches the method
    with pytest.raises(ConfigError, match="method.name='mae' is invalid: has no recipe for preset=paper"):
        validate(cfg)


def test_recipe_keys_are_run_only_for_the_signature(compose):
    from core.config import signature
    a, b = compose("preset=paper", "method=mae"), compose("preset=paper", "method=mae")
    b.recipe.sources["pretrain.epochs"] = "another wording"
    assert signature(a) == signature(b)


@pytest.mark.parametrize("sweep,method,epochs", [("maskalign_topk", "maskalign", 200),
                                                 ("semanticmim_baselines", "semanticmim", 300)])
def test_cfg_job_prints_the_recipe_of_the_sweeps_method(sweep, method, epochs):
    res = run_cli("sweeps/run.py", f"sweep={sweep}", "preset=paper", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    printed = OmegaConf.create(res.stdout)
    assert printed.method.name == method and printed.pretrain.epochs == epochs
    assert printed.recipe.name == recipe_data(f"paper_{method_choice(sweep, [])}")["recipe.name"]


def test_report_caption_names_the_recipe(compose):
    from reports.build import describe
    from sweeps.grid import Point
    from sweeps.plan import Planned

    def planned(cfg, uses_teacher=None):  # None: as planned without checks and not matched to a run
        return Planned(Point("x", 0, []), cfg, "", uses_teacher=uses_teacher)
    maskalign = compose("preset=paper", "method=maskalign")
    caption = describe([planned(maskalign)])
    assert "recipe: MaskAlign (Xue et al. 2023), official code" in caption
    assert "recipe: none" in describe([planned(compose())])
    # what a matched run says of its teacher is what the method says (no method imported then)
    assert describe([planned(maskalign, uses_teacher=True)]) == caption


# ---- the options the recipes set (off in the embedded defaults)

@pytest.mark.parametrize("override", ["data.interpolation=bicubic", "data.color_jitter=0.4"])
def test_folder_only_options_are_refused_for_in_memory_data(compose, override):
    from core.job import validate
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* is invalid: must be .* for data.source=embedded"):
        validate(compose(override))


def test_the_evaluation_view_resizes_to_eval_resize_then_crops_the_centre():
    import torch
    from core.training.data import Plain
    img = torch.zeros(1, 40, 40, dtype=torch.uint8)
    img[:, :4], img[:, -4:], img[:, :, :4], img[:, :, -4:] = 255, 255, 255, 255    # a white frame 4 px wide
    base = [(img, 0)]
    whole, _ = Plain(base, 32)[0]                 # the whole image shrunk: the frame stays at the edge
    centre, _ = Plain(base, 32, resize=40, interpolation="bicubic")[0]   # 32 px of the middle of 40: no frame
    assert whole.shape == centre.shape == (1, 32, 32)
    assert whole[0, 0].min() > 0.9 and centre[0, 0].max() < 0.05 and centre[0, 16, 16] < 0.05


def test_colour_jitter_comes_first_and_changes_colours_only_when_asked():
    import torch
    from core.training.data import Augmented
    g = torch.Generator().manual_seed(0)
    base = [(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g), 0)]
    plain = Augmented(base, 32, (1.0, 1.0), interpolation="bicubic")
    jitter = Augmented(base, 32, (1.0, 1.0), interpolation="bicubic", color_jitter=0.4)
    names = [type(t).__name__ for t in jitter.transform.transforms]
    assert names == ["ColorJitter", "RandomHorizontalFlip", "RandomResizedCrop"]     # BEiT's order
    assert [type(t).__name__ for t in plain.transform.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert not torch.equal(plain[(0, 1)][0], jitter[(0, 1)][0])


def test_the_adamw_probe_without_batchnorm_learns_and_has_no_batchnorm():
    import torch
    from core.evaluation.linear_probe import HeadGrid, train_grid
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in HeadGrid({"v": 8}, [0.1], 3, norm="none").modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in HeadGrid({"v": 8}, [0.1], 3).modules())
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 8, generator=g)
    y = torch.randint(0, 3, (600,), generator=g)
    f = centres[y] + torch.randn(600, 8, generator=g)
    best = train_grid({"v": f[:400]}, y[:400], {"v": f[400:]}, y[400:], 3, [1e-2], epochs=10, batch_size=64,
                      weight_decay=1e-4, optimizer="adamw", norm="none")
    assert best["v"][0] > 90
