"""Visual tokenizers for BEiT-style targets (core/targets/tokenizers.py): the packaged k-means codebook gives
meaningful, reproducible tokens on the embedded data; the DALL-E path loads a real pickled dall_e encoder
and fails with errors that say which key to fix and how."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from core.targets.tokenizers import KMEANS_ASSET, build_tokenizer, code_usage, nearest, patch_descriptors

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "core" / "assets" / "fashion_mnist_subset.npz"
HAS_DALL_E = importlib.util.find_spec("dall_e") is not None


def cfg(kind, path=None):
    return OmegaConf.create({"kind": kind, "path": path})


def images(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(EMBEDDED)
    x = torch.from_numpy(data[f"{split}_images"][:n]).float().div(255).unsqueeze(1)  # [n, 1, 28, 28]
    return x, torch.from_numpy(data[f"{split}_labels"][:n])


@pytest.fixture(scope="module")
def kmeans_tok():
    return build_tokenizer(cfg("kmeans"))  # empty path: the packaged codebook


@pytest.fixture(scope="module")
def test_tokens(kmeans_tok):
    x, _ = images("test")
    return kmeans_tok(x, 7)  # [2000, 49]


# ------------------------------------------------------------------------------------------------- kmeans


def test_edge_features_are_scikit_images_hog_per_channel():
    """The descriptor's edge group is skimage's HOG convention (the codebook was learnt with it), per channel."""
    from skimage.feature import hog as skimage_hog

    from core.targets.tokenizers import edge_histograms
    x, _ = images("train", 8)
    ours = edge_histograms(x, cell_size=4)                      # one cell per vit_micro patch
    ref = np.stack([skimage_hog(x[i, 0].double().numpy(), orientations=9, pixels_per_cell=(4, 4),
                                cells_per_block=(1, 1), block_norm="L2", feature_vector=False)[:, :, 0, 0, :]
                    for i in range(8)])
    np.testing.assert_allclose(ours[:, 0].numpy(), ref, rtol=0, atol=1e-6)


def test_kmeans_ids_on_the_student_grid(kmeans_tok, test_tokens):
    assert kmeans_tok.vocab_size == 256
    assert test_tokens.shape == (2000, 49) and test_tokens.dtype == torch.long
    assert test_tokens.min() >= 0 and test_tokens.max() < kmeans_tok.vocab_size


def test_kmeans_is_deterministic_and_per_image(kmeans_tok, test_tokens):
    x, _ = images("test", 16)
    assert torch.equal(kmeans_tok(x, 7), test_tokens[:16])
    # An image's tokens do not depend on the rest of its batch.
    assert torch.equal(kmeans_tok(x[5:6], 7), test_tokens[5:6])


def test_kmeans_tokens_follow_patch_order(kmeans_tok):
    # Content moved by one patch moves its tokens by one grid position: ids are row-major over the grid.
    x, _ = images("test", 8)
    shifted = torch.zeros_like(x)
    shifted[..., :, 4:] = x[..., :, :-4]  # one patch to the right
    a, b = kmeans_tok(x, 7).view(8, 7, 7), kmeans_tok(shifted, 7).view(8, 7, 7)
    # Shifted grid columns 2..5 hold what columns 1..4 held, with the same neighbouring pixels for the
    # gradients (grid columns 0, 1 and 6 meet the image border or the zero fill), so their ids must match.
    assert torch.equal(b[:, :, 2:6], a[:, :, 1:5])


def test_kmeans_codebook_covers_and_compresses_the_test_split(kmeans_tok, test_tokens):
    # The codebook never saw the test split; it must still use most codes there, and describe test
    # patches far better than a random code would (a codebook that collapsed or memorised would not).
    used, perplexity = code_usage(test_tokens, kmeans_tok.vocab_size)
    assert used > 0.95 and perplexity > 50  # measured: 100 % used, perplexity 91.6
    x, _ = images("test")
    desc = patch_descriptors(x, kmeans_tok.settings).reshape(-1, kmeans_tok.settings.dim)
    ids, err = nearest(desc, kmeans_tok.centroids)
    assert torch.equal(ids.view(2000, 49), test_tokens)
    rand = torch.randint(kmeans_tok.vocab_size, (desc.shape[0],), generator=torch.Generator().manual_seed(0))
    rand_err = ((desc - kmeans_tok.centroids[rand]) ** 2).sum(-1)
    assert err.mean() < 0.2 * rand_err.mean()  # measured 0.228 against 2.09


def test_kmeans_tokens_carry_class_information(kmeans_tok):
    # 1-NN on the token grids alone (count of equal ids at equal positions): far above chance (10 %).
    train_x, train_y = images("train", 2000)
    test_x, test_y = images("test", 500)
    a, b = kmeans_tok(train_x, 7), kmeans_tok(test_x, 7)  # [2000, 49], [500, 49]
    agreement = (b[:, None, :] == a[None, :, :]).sum(-1)  # [500, 2000]
    accuracy = (train_y[agreement.argmax(1)] == test_y).float().mean().item()
    assert accuracy > 0.6  # measured 0.72 (raw-pixel 1-NN on the same split: 0.79)


def test_kmeans_runs_on_other_inputs(kmeans_tok):
    # RGB and larger images: averaged to gray and resized to 4 px per token, any grid.
    rgb = torch.rand(2, 3, 224, 224)
    ids = kmeans_tok(rgb, 14)
    assert ids.shape == (2, 196) and 0 <= ids.min() and ids.max() < 256


def test_make_script_reproduces_the_shipped_asset():
    # The full fit (same seed, sample, iterations) on the training split; ~8 s on one thread. One thread
    # because k-means is many small ops (see the script); float64 makes the result thread-count free.
    spec = importlib.util.spec_from_file_location("make_kmeans_tokenizer",
                                                  REPO / "core" / "assets" / "make_kmeans_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    shipped = torch.load(KMEANS_ASSET, map_location="cpu", weights_only=True)
    assert shipped["fit"]["split"] == "train" and KMEANS_ASSET.stat().st_size < 300_000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rebuilt = script.make_codebook(script.load_images("train"), log=lambda *_: None, **{
            k: shipped["fit"][k] for k in ("k", "iters", "sample", "seed")})
    finally:
        torch.set_num_threads(threads)
    assert rebuilt["settings"] == shipped["settings"]
    torch.testing.assert_close(rebuilt["centroids"], shipped["centroids"], rtol=0, atol=1e-6)


def test_kmeans_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"method\.tokenizer\.path=.*is invalid: no such file"):
        build_tokenizer(cfg("kmeans", str(tmp_path / "nope.pt")))


def test_unknown_kind_names_the_key():
    with pytest.raises(ValueError, match=r"method\.tokenizer\.kind='vqgan' is invalid: expected one of kmeans, dalle"):
        build_tokenizer(cfg("vqgan"))


# -------------------------------------------------------------------------------------------------- dalle


@pytest.mark.parametrize("path", [None, "/nonexistent/encoder.pkl"])
def test_dalle_missing_file_says_what_to_do(path):
    # Whether or not dall_e is installed: the file is checked first.
    with pytest.raises(FileNotFoundError, match=r"method\.tokenizer\.path=.*is invalid:.*encoder\.pkl.*"
                                                r"set method\.tokenizer\.path"):
        build_tokenizer(cfg("dalle", path))


def test_dalle_without_package_says_pip_install(tmp_path, monkeypatch):
    path = tmp_path / "encoder.pkl"
    path.write_bytes(b"not needed: the import fails first")
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import dall_e` raise ImportError
    with pytest.raises(ValueError, match=r"method\.tokenizer\.path=.*is invalid:.*pip install DALL-E"):
        build_tokenizer(cfg("dalle", str(path)))


@pytest.mark.skipif(not HAS_DALL_E, reason="pip install DALL-E (dall_e package)")
def test_dalle_loads_a_pickled_encoder(tmp_path):
    from dall_e.encoder import Encoder
    from dall_e.utils import map_pixels

    torch.manual_seed(0)
    # The real architecture at its smallest (the real file: n_hid=256, 2 blocks per group, 8192 codes),
    # pickled whole with torch.save as OpenAI's encoder.pkl is.
    encoder = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    path = tmp_path / "encoder.pkl"
    torch.save(encoder, path)
    tok = build_tokenizer(cfg("dalle", str(path)))
    assert tok.vocab_size == 512

    x, _ = images("test", 4)  # gray 28 px, the embedded default's grid of 7
    ids = tok(x, 7)
    assert ids.shape == (4, 49) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < 512 and len(ids.unique()) > 1
    # The documented recipe: gray -> 3 channels, resized to 8 px per token, map_pixels, argmax.
    rgb = F.interpolate(x.expand(-1, 3, -1, -1), size=(56, 56), mode="bilinear", align_corners=False,
                        antialias=True).clamp(0, 1)
    with torch.no_grad():
        expected = encoder(map_pixels(rgb)).argmax(1).flatten(1)
    assert torch.equal(ids, expected)
    # BEiT's setting: 224 px RGB views, 14x14 grid -> the encoder sees 112 px.
    assert tok(torch.rand(2, 3, 224, 224), 14).shape == (2, 196)
    assert not any(p.requires_grad for p in tok.encoder.parameters())


@pytest.mark.skipif(not HAS_DALL_E, reason="pip install DALL-E (dall_e package)")
def test_dalle_rejects_a_file_that_is_not_the_encoder(tmp_path):
    path = tmp_path / "decoder.pkl"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"method\.tokenizer\.path=.*is invalid: it holds a Linear"):
        build_tokenizer(cfg("dalle", str(path)))
    path.write_bytes(b"<html>a failed download</html>")
    with pytest.raises(ValueError, match=r"method\.tokenizer\.path=.*is invalid: could not be unpickled"):
        build_tokenizer(cfg("dalle", str(path)))
