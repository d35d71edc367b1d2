"""Visual tokenizers for BEiT-style targets: an image -> one discrete token id per patch of the student's grid.

BEiT (and SemanticMIM's BEiT baseline) predicts, for every masked patch, the id a frozen tokenizer gives
that patch, with a cross-entropy loss. One interface, two tokenizers:

    tokenizer = build_tokenizer(cfg.method.tokenizer)   # keys: kind (kmeans | dalle), path (a file)
    ids = tokenizer(imgs01, grid)                        # [B, C, H, W] in [0, 1] -> LongTensor [B, grid*grid]
    tokenizer.vocab_size                                 # the number of classes of the loss

Ids come in row-major order over the grid, the order of `core.vit.patchify`.

`dalle` is the paper's tokenizer: OpenAI's DALL-E dVAE encoder (`encoder.pkl`, 8192 codes), a pickled
module of the `dall_e` package (`pip install DALL-E`), read from a local file because compute nodes have
no network. It sees 3 channels at 8 px per token, so the batch is resized to 8*grid px (112 px for a
14x14 grid, as BEiT does) and mapped with the package's `map_pixels`; a token is the argmax of the logits.

`kmeans` is the offline stand-in for the embedded default (28x28 grayscale Fashion-MNIST, patch 4 ->
7x7 grid), where a dVAE trained on ImageNet photos has nothing to say about 4-pixel patches and could not
be shipped anyway. Each patch is described by three groups of features, each of norm at most ~1 so that
none dominates the distance:

- shape (p*p values): the patch's pixels minus their mean, divided by sqrt(var + 0.01), scaled by 1/p;
  the floor of 0.01 keeps near-flat patches near zero instead of amplifying their noise into a pattern;
- level (2 values): the patch's mean and twice its standard deviation, so background, flat fabric and
  textured fabric with the same shape stay apart;
- edges (9 values): the patch's orientation histogram (`edge_histograms`, scikit-image's HOG convention, one
  cell per patch), the orientation of its edges,
  which the raw pixels of a 4x4 patch only carry implicitly and which makes nearby outlines (a collar
  edge, a sleeve edge) share tokens across small shifts.

A codebook of K = 256 centroids is learnt by k-means (k-means++ init, Lloyd iterations, fixed seed) on a
fixed random sample of 100,000 patch descriptors of the embedded TRAINING split only, by
`core/assets/make_kmeans_tokenizer.py`, and shipped as `core/assets/kmeans_tokenizer.pt` (centroids plus
the descriptor settings). A token is the id of the nearest centroid. On another dataset the tokenizer
still runs (channels averaged to gray, images resized to patch*grid px) but its codebook was learnt on
Fashion-MNIST.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.vit import patchify

KINDS = ("kmeans", "dalle")
KMEANS_ASSET = Path(__file__).resolve().parents[1] / "assets" / "kmeans_tokenizer.pt"
DALLE_TO_GET = ("download encoder.pkl from OpenAI's DALL-E release (https://cdn.openai.com/dall-e/encoder.pkl) "
                "onto the cluster and set method.tokenizer.path to that file")


def _resize(imgs: torch.Tensor, size: int) -> torch.Tensor:
    """imgs: [B, C, H, W] -> [B, C, size, size], antialiased when shrinking (a tokenizer must not alias)."""
    if imgs.shape[-2:] == (size, size):
        return imgs
    return F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- k-means

EDGE_EPS = 1e-5  # skimage's block-normalisation eps; it enters squared, under the square root


def _central_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, H, W] -> (g_row, g_col), each [B, C, H, W], zero on the borders they cannot reach."""
    # Central differences on the interior only, then zero-padded: a padded *image* would instead give
    # the border pixels a one-sided gradient, which is not what the reference does.
    g_row = F.pad(x[:, :, 2:, :] - x[:, :, :-2, :], (0, 0, 1, 1))
    g_col = F.pad(x[:, :, :, 2:] - x[:, :, :, :-2], (1, 1, 0, 0))
    return g_row, g_col


@torch.no_grad()
def edge_histograms(imgs: torch.Tensor, cell_size: int = 8, bins: int = 9) -> torch.Tensor:
    """Per-channel orientation histograms of a batch in scikit-image's HOG convention (the k-means codebook
    was learnt with these; MaskFeat's HOG target is core/targets/hog.py): imgs [B, C, H, W] in [0, 1] ->
    [B, C, H//cell, W//cell, bins] float32. Central differences ([-1, 0, 1], 0 on the image border),
    orientation atan2(g_row, g_col) mod 180 in `bins` bins, each cell the mean magnitude-weighted vote of its
    pixels, divided by sqrt(sum of squares + 1e-10) (skimage's L2 block norm of a 1x1 block).
    """
    if imgs.dim() != 4:
        raise ValueError(f"edge_histograms expects images [B, C, H, W], got shape {tuple(imgs.shape)}.")
    B, C, H, W = imgs.shape
    nh, nw = H // cell_size, W // cell_size
    if nh == 0 or nw == 0:
        raise ValueError(f"edge_histograms: images of {H}x{W} px hold no whole cell of cell_size={cell_size} px.")
    # float32 throughout: bins are hard thresholds, but no edge of the 9 default bins (20, 40, ... degrees)
    # has a rational tangent, so 8-bit images never come within float32 rounding of one (measured: 0 of
    # 11.8M pixels of Fashion-MNIST train and 6 skimage.data images change bin against float64).
    x = imgs.float()
    g_row, g_col = _central_differences(x)  # [B, C, H, W] each
    magnitude = torch.hypot(g_row, g_col)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0  # [B, C, H, W] in [0, 180]
    # floor(o / width) is the bin of [i*width, (i+1)*width); the clamp keeps in the last bin an angle just
    # below 0, which `% 180` can round up to exactly 180.0.
    index = torch.div(orientation, 180.0 / bins, rounding_mode="floor").long().clamp_(0, bins - 1)

    # Gather every cell's pixels onto one axis, then vote bin by bin: no loop over pixels or cells. A
    # scatter_add_ would do it in one call, but on CUDA it sums with atomics (order-dependent results,
    # and an error under torch.use_deterministic_algorithms); 9 masked sums are deterministic everywhere.
    def cells(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, nh, nw, cell*cell]
        t = t[:, :, : nh * cell_size, : nw * cell_size]
        t = t.reshape(B, C, nh, cell_size, nw, cell_size).permute(0, 1, 2, 4, 3, 5)
        return t.reshape(B, C, nh, nw, cell_size * cell_size)

    index, magnitude = cells(index), cells(magnitude)
    hist = torch.stack([(magnitude * (index == i)).sum(dim=-1) for i in range(bins)], dim=-1)  # [B, C, nh, nw, bins]
    hist /= cell_size * cell_size  # skimage's vote is the cell's mean magnitude
    hist = hist / torch.sqrt((hist * hist).sum(dim=-1, keepdim=True) + EDGE_EPS**2)
    return hist


@dataclass(frozen=True)
class DescriptorSettings:
    """How a patch becomes the vector k-means clusters (stored in the asset, so tokens stay reproducible).

    patch_size: pixels per patch side the codebook was learnt at; channels: image channels it saw;
    var_floor: added to the patch variance before dividing by its square root; bins: HOG orientations.
    """
    patch_size: int = 4
    channels: int = 1
    var_floor: float = 0.01
    bins: int = 9

    @property
    def dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels + 2 + self.bins


@torch.no_grad()
def patch_descriptors(imgs01: torch.Tensor, settings: DescriptorSettings) -> torch.Tensor:
    """imgs01: [B, C, p*g, p*g] in [0, 1] -> descriptors [B, g*g, D] in patchify order (see module doc)."""
    p = settings.patch_size
    pix = patchify(imgs01.float(), p)  # [B, N, p*p*C]
    mean = pix.mean(dim=-1, keepdim=True)
    var = pix.var(dim=-1, unbiased=False, keepdim=True)
    shape = (pix - mean) / torch.sqrt(var + settings.var_floor) / p  # [B, N, p*p*C], norm <= ~1
    level = torch.cat([mean, 2 * var.sqrt()], dim=-1)  # [B, N, 2]
    edges = edge_histograms(imgs01, cell_size=p, bins=settings.bins)  # [B, C, g, g, bins]
    B, C, g = edges.shape[:3]
    # Channels averaged so the edge group keeps unit scale whatever C is; cells in patchify's row-major order.
    edges = edges.mean(dim=1).reshape(B, g * g, settings.bins)  # [B, N, bins]
    return torch.cat([shape, level, edges], dim=-1)


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x: [N, D], centroids: [K, D] -> squared Euclidean distances [N, K] (one matmul, no [N, K, D])."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.clamp_min_(0)


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, D] -> (ids [N] of the nearest centroid, squared distance [N] to it), in chunks of rows."""
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk):
        d = _sq_distances(x[start: start + chunk], centroids)  # [n, K]
        best = d.min(dim=1)
        ids.append(best.indices)
        dists.append(best.values)
    return torch.cat(ids), torch.cat(dists)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, log=None) -> torch.Tensor:
    """Batched k-means on x: [N, D] -> centroids [k, D] (k-means++ init, then `iters` Lloyd steps).

    Deterministic for a seed. Run in float64 so that near-ties between two centroids, which float32
    rounding (and with it the BLAS thread count) would decide, practically never occur: one flipped point
    moves a centroid and every later iteration. The shipped codebook is rebuilt bit for bit at 1 and 2
    threads.
    """
    x = x.double()
    N = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # k-means++: each new centroid is drawn with probability proportional to the squared distance to the
    # nearest centroid so far, which spreads the initial codebook over the data.
    centroids = x[torch.randint(N, (1,), generator=gen)]
    closest = _sq_distances(x, centroids)[:, 0]  # [N]
    for _ in range(1, k):
        pick = torch.multinomial(closest / closest.sum(), 1, generator=gen)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, _sq_distances(x, x[pick])[:, 0])
    for it in range(iters):
        ids, dists = nearest(x, centroids)
        counts = torch.bincount(ids, minlength=k)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)  # CPU index_add_: deterministic
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # An empty code is wasted vocabulary: re-seed it at the worst-served points.
            new[empty] = x[dists.topk(len(empty)).indices]
        centroids = new
        if log is not None:
            log(f"  iteration {it + 1:2d}/{iters}: mean squared distance {dists.mean().item():.5f}, "
                f"empty codes re-seeded {len(empty)}")
    return centroids


def code_usage(ids: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """ids: any shape -> (fraction of the vocabulary used at least once, perplexity of the id histogram)."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    prob = counts / counts.sum()
    entropy = -(prob[prob > 0] * prob[prob > 0].log()).sum().item()
    return (counts > 0).double().mean().item(), math.exp(entropy)


class KMeansTokenizer:
    """Nearest-centroid tokens of patch descriptors (see module docstring); frozen, no gradients."""

    def __init__(self, centroids: torch.Tensor, settings: DescriptorSettings):
        self.centroids = centroids.float()  # [K, D]
        self.settings = settings
        self.vocab_size = int(centroids.shape[0])

    @classmethod
    def load(cls, path: str | Path) -> "KMeansTokenizer":
        asset = torch.load(path, map_location="cpu", weights_only=True)
        return cls(asset["centroids"], DescriptorSettings(**asset["settings"]))

    @torch.no_grad()
    def __call__(self, imgs01: torch.Tensor, grid: int) -> torch.Tensor:
        """imgs01: [B, C, H, W] in [0, 1] -> token ids [B, grid*grid] (int64, in [0, vocab_size))."""
        s = self.settings
        if imgs01.shape[1] != s.channels:
            if s.channels != 1:
                raise ValueError(f"kmeans tokenizer: codebook learnt on {s.channels} channels, "
                                 f"got images with {imgs01.shape[1]}.")
            imgs01 = imgs01.mean(dim=1, keepdim=True)  # [B, 1, H, W]
        x = patch_descriptors(_resize(imgs01.float(), s.patch_size * grid), s)  # [B, N, D]
        self.centroids = self.centroids.to(x.device)
        ids, _ = nearest(x.reshape(-1, x.shape[-1]), self.centroids)
        return ids.reshape(x.shape[0], grid * grid)


# ----------------------------------------------------------------------------------------------- DALL-E


class DalleTokenizer:
    """OpenAI's DALL-E dVAE encoder: argmax of its logits at 8 px per token; frozen, no gradients."""

    def __init__(self, encoder: nn.Module, map_pixels):
        self.encoder = encoder.eval().requires_grad_(False)
        self.map_pixels = map_pixels
        self.vocab_size = int(encoder.vocab_size)
        self.channels = int(encoder.input_channels)

    @torch.no_grad()
    def __call__(self, imgs01: torch.Tensor, grid: int) -> torch.Tensor:
        """imgs01: [B, C, H, W] in [0, 1] -> token ids [B, grid*grid] (int64, in [0, vocab_size))."""
        if imgs01.shape[1] == 1 and self.channels == 3:
            imgs01 = imgs01.expand(-1, 3, -1, -1)  # gray -> RGB, the encoder only knows colour inputs
        x = self.map_pixels(_resize(imgs01.float(), 8 * grid).contiguous())  # [B, 3, 8g, 8g]
        self.encoder.to(x.device)
        logits = self.encoder(x)  # [B, vocab, g, g]
        return logits.argmax(dim=1).flatten(1)  # [B, g*g], rows of the grid in order


def _load_dalle(path: str) -> DalleTokenizer:
    key = f"method.tokenizer.path={path!r} is invalid"
    # The file first: it is what a user has to fetch by hand, whether or not the package is there.
    if not path:
        raise FileNotFoundError(f"{key}: method.tokenizer.kind='dalle' needs the dVAE encoder file; {DALLE_TO_GET}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: no such file; {DALLE_TO_GET}.")
    try:
        import dall_e  # noqa: F401 - unpickling the encoder needs its classes importable
        from dall_e.encoder import Encoder
        from dall_e.utils import map_pixels
    except ImportError as e:
        raise ValueError(f"{key}: the DALL-E encoder is a pickled module of the `dall_e` package, which is not "
                         f"importable here ({e}); pip install DALL-E (PyPI 'DALL-E==0.1').") from e
    # A pickled module, not a state dict: weights_only=False runs the pickle, so only point this at
    # OpenAI's encoder.pkl (or a file you made yourself).
    try:
        encoder = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated download or a different file: say which key to fix
        raise ValueError(f"{key}: could not be unpickled ({type(e).__name__}: {e}); {DALLE_TO_GET}.") from e
    if not isinstance(encoder, Encoder):
        raise ValueError(f"{key}: it holds a {type(encoder).__name__}, not a dall_e Encoder "
                         f"(decoder.pkl is the other half of the dVAE); {DALLE_TO_GET}.")
    return DalleTokenizer(encoder, map_pixels)


def build_tokenizer(cfg):
    """cfg (e.g. `cfg.method.tokenizer`) with `kind` (kmeans | dalle) and `path` -> a frozen tokenizer.

    `path` may be left empty for kmeans (the packaged codebook); dalle needs the encoder file.
    """
    kind = cfg.get("kind")
    path = cfg.get("path") or None
    if kind == "kmeans":
        path = path or KMEANS_ASSET
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"method.tokenizer.path={str(path)!r} is invalid: no such file; leave it empty for the packaged "
                f"codebook, or build one with core/assets/make_kmeans_tokenizer.py --out FILE.")
        return KMeansTokenizer.load(path)
    if kind == "dalle":
        return _load_dalle(str(path) if path else "")
    raise ValueError(f"method.tokenizer.kind={kind!r} is invalid: expected one of {', '.join(KINDS)}.")
