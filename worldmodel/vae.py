"""The ConvVAE (World Models' "V"), its loss, and loading a trained one to encode frames.

Architecture (defaults = World Models' V): ``len(widths)`` convolutions with kernel 4, stride 2
and padding 1 (each halves the image: 64 -> 32 -> 16 -> 8 -> 4), ReLU, flattened to
``feature_dim = widths[-1] * s * s`` features, then two linear heads for ``mu`` and ``logvar``.
The decoder mirrors it: a linear layer back to ``(widths[-1], s, s)`` and transposed
convolutions with kernel 4, stride 2, padding 1 to the input size, sigmoid at the end. Odd
sizes on the way down (84 -> 42 -> 21 -> 10 -> 5) are undone exactly by giving each transposed
convolution ``output_padding = size % 2`` of the matching encoder level, so any input size that
survives the halvings (64, 84, 96, ...) is reconstructed at exactly its own size. With
``decoder="broadcast"`` the linear layer is replaced by a spatial broadcast head
(:class:`SpatialBroadcast`: ``z`` tiled over an 8x8 grid with x/y coordinate channels), which
makes object positions linear directions of the latent; the quickstart uses it.

Loss (:func:`vae_loss`), per frame, then averaged over the batch:

* reconstruction: the SUM over all ``C * H * W`` pixel values of the squared error (``mse``)
  or of the binary cross-entropy (``bce``), i.e. a Gaussian / Bernoulli log-likelihood up to
  constants, as in World Models. ``bce`` is computed from the decoder's logits
  (``binary_cross_entropy_with_logits``): on sigmoid outputs a saturated pixel (``sigmoid``
  rounds to exactly 0 or 1) has a clamped loss and no gradient, and could never recover.
  Summing (not averaging) over pixels keeps the pixel term on the scale of the KL term (nats),
  so ``beta = 1`` is a real ELBO; a per-pixel mean would divide the reconstruction by 12,288
  at 64x64x3 and let the KL term switch every latent off.
* KL: ``KL_j = -0.5 * (1 + logvar_j - mu_j^2 - exp(logvar_j))`` per latent dimension ``j``,
  averaged over the batch, giving a ``(Z,)`` vector. Free bits: each dimension's batch-mean KL
  is clamped below at ``kl_tolerance`` nats, ``sum_j max(KL_j, kl_tolerance)``, so a dimension
  whose KL is below the tolerance adds the constant ``kl_tolerance`` and gets no gradient from
  the KL term (it is free to carry information up to that amount). World Models clamps the
  summed KL at ``kl_tolerance * Z``; clamping per dimension (Kingma et al. 2016) keeps one busy
  dimension from paying for all the idle ones.
* ``loss = recon + beta * kl_clamped``. The reported ``kl`` is the unclamped ``sum_j KL_j``.

Example:
    >>> import torch
    >>> model = ConvVAE(image_size=32, channels=3, latent_dim=8, widths=(8, 16))
    >>> out = model(torch.rand(2, 3, 32, 32))
    >>> tuple(out.recon.shape), tuple(out.mu.shape)
    ((2, 3, 32, 32), (2, 8))
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.errors import ConfigError, RunNotFoundError, UserError
from worldmodel.io import atomic_write

if TYPE_CHECKING:
    from envs.config import EnvConfig
    from worldmodel.config import Config, VAEConfig

__all__ = [
    "ConvVAE",
    "LoadedVAE",
    "LossTerms",
    "VAEOutput",
    "build_vae",
    "frames_to_tensor",
    "load_checkpoint",
    "load_vae",
    "save_checkpoint",
    "state_dict_hash",
    "vae_loss",
]


class VAEOutput(NamedTuple):
    """What :meth:`ConvVAE.forward` returns.

    :param recon: ``(B, C, H, W)`` float32 in ``[0, 1]``, the decoded ``z``.
    :param mu: ``(B, Z)`` float32, posterior mean.
    :param logvar: ``(B, Z)`` float32, posterior log-variance.
    :param z: ``(B, Z)`` float32, a reparameterised sample (``mu`` itself in eval mode).
    :param logits: ``(B, C, H, W)`` float32, the decoder output before the sigmoid
        (``recon = sigmoid(logits)``); ``None`` when the output was built without it.
    """

    recon: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor
    logits: Tensor | None = None


class LossTerms(NamedTuple):
    """The terms of :func:`vae_loss` (all float32 tensors).

    :param loss: scalar, ``recon + beta * sum_j max(KL_j, kl_tolerance)``; what is minimised.
    :param recon: scalar, reconstruction loss summed over pixels, mean over the batch.
    :param kl: scalar, unclamped KL summed over latent dimensions, mean over the batch (nats).
    :param kl_per_dim: ``(Z,)``, batch-mean KL of each latent dimension (nats).
    """

    loss: Tensor
    recon: Tensor
    kl: Tensor
    kl_per_dim: Tensor


def frames_to_tensor(
    frames: np.ndarray | Tensor, device: torch.device | str | None = None
) -> Tensor:
    """Convert frames to network input: THE one place where this happens.

    :param frames: uint8 ``(N, H, W, C)`` numpy array or tensor.
    :param device: where the result lives (default: the CPU, or the tensor's device).
    :return: float32 ``(N, C, H, W)`` in ``[0, 1]``.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    x = frames
    if device is not None:
        x = x.to(device, non_blocking=True)
    # A contiguous NCHW copy: convolutions on the permuted (channels-last) view are ~1.5x slower.
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _conv_sizes(image_size: int, n_layers: int) -> list[int]:
    """Spatial sizes through ``n_layers`` convs with kernel 4, stride 2, padding 1."""
    sizes = [image_size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 2 - 4) // 2 + 1)
    return sizes


class SpatialBroadcast(nn.Module):
    """The head of a spatial broadcast decoder (Watters et al. 2019, arXiv:1901.07017).

    ``z`` is copied to every cell of an ``s x s`` grid, two channels with the cell's ``x`` and
    ``y`` in ``[-1, 1]`` are appended, and two 3x3 convs (ReLU) make a ``(B, C, s, s)`` feature
    map. Drawing an object at position ``p`` then only needs "compare ``p`` with the cell's
    coordinates", which a latent holding ``p`` linearly makes easiest: the VAE learns object
    positions as (nearly) linear latent directions, where the ``deconv`` decoder often learns a
    folded code that a linear probe cannot read (measured on Reach: docs/quickstart/tuning.md).

    :param latent_dim: ``Z``.
    :param channels: ``C``, output channels.
    :param size: ``s``, grid side.
    """

    coords: Tensor  # (1, 2, s, s) buffer: x and y of each cell

    def __init__(self, latent_dim: int, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        lin = torch.linspace(-1.0, 1.0, size)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)
        self.conv1 = nn.Conv2d(latent_dim + 2, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """``(B, Z)`` -> ``(B, C, s, s)``."""
        b = z.shape[0]
        grid = z[:, :, None, None].expand(b, z.shape[1], self.size, self.size)
        h = torch.cat([grid, self.coords.expand(b, 2, self.size, self.size)], dim=1)
        return F.relu(self.conv2(F.relu(self.conv1(h))))


class ConvVAE(nn.Module):
    """Convolutional VAE; see the module docstring for the architecture and the loss.

    :param image_size: input side ``H = W`` in pixels.
    :param channels: input channels ``C`` (1 grayscale, 3 RGB).
    :param latent_dim: size ``Z`` of the latent vector.
    :param widths: encoder conv channels, each conv halving the image; the decoder mirrors them.
    :param decoder: ``deconv`` (World Models: a linear layer to the smallest feature map, then
        transposed convs) or ``broadcast`` (spatial broadcast, see :class:`SpatialBroadcast`).
    :param broadcast_size: with ``broadcast``, ``z`` is tiled over the smallest encoder feature
        map at least this wide (8x8 at 64 px, 10x10 at 84 px), then mirrored transposed convs.
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: int = 3,
        latent_dim: int = 32,
        widths: Sequence[int] = (32, 64, 128, 256),
        decoder: Literal["deconv", "broadcast"] = "deconv",
        broadcast_size: int = 8,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        sizes = _conv_sizes(image_size, len(widths))
        if not widths or min(widths) < 1 or latent_dim < 1 or channels < 1:
            raise ConfigError("vae: widths, latent_dim and channels must all be >= 1")
        if sizes[-1] < 1:
            raise ConfigError(
                f"vae.widths: {len(widths)} stride-2 convs shrink a {image_size}px image to "
                f"nothing ({sizes}); use fewer widths or a larger env.image_size"
            )
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim
        self.widths = tuple(widths)
        self._bottom = (widths[-1], sizes[-1], sizes[-1])
        self.feature_dim = widths[-1] * sizes[-1] * sizes[-1]

        layers: list[nn.Module] = []
        for c_in, c_out in zip([channels, *widths[:-1]], widths, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        #: ``(B, C, H, W)`` float32 in [0, 1] -> ``(B, feature_dim)`` features.
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.fc_mu = nn.Linear(self.feature_dim, latent_dim)
        self.fc_logvar = nn.Linear(self.feature_dim, latent_dim)

        if decoder == "deconv":
            top = len(widths)
            self.fc_decode: nn.Linear | None = nn.Linear(latent_dim, self.feature_dim)
            self.broadcast: SpatialBroadcast | None = None
        elif decoder == "broadcast":
            # The smallest encoder feature map at least broadcast_size wide (8 for 64 px).
            top = max(i for i in range(1, len(sizes)) if sizes[i] >= min(broadcast_size,
                                                                         sizes[1]))
            self.fc_decode = None
            self.broadcast = SpatialBroadcast(latent_dim, widths[top - 1], sizes[top])
        else:
            raise ConfigError(f"vae.decoder must be deconv or broadcast, got {decoder!r}")
        self.decoder_type = decoder
        ups: list[nn.Module] = []
        outs = [channels, *widths[:-1]]
        for level in reversed(range(top)):
            ups.append(
                nn.ConvTranspose2d(
                    widths[level], outs[level], 4, stride=2, padding=1,
                    output_padding=sizes[level] % 2,
                )
            )
            if level > 0:
                ups.append(nn.ReLU())
        #: ``(B, widths[top - 1], s, s)`` -> ``(B, C, H, W)`` logits.
        self.decoder = nn.Sequential(*ups)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters.

        :param x: ``(B, C, H, W)`` float32 in ``[0, 1]`` (see :func:`frames_to_tensor`).
        :return: ``mu, logvar``, each ``(B, Z)`` float32.
        """
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Pre-sigmoid decoder output: ``(B, Z)`` -> ``(B, C, H, W)`` float32."""
        if self.broadcast is not None:
            return self.decoder(self.broadcast(z))
        assert self.fc_decode is not None
        return self.decoder(F.relu(self.fc_decode(z)).view(-1, *self._bottom))

    def decode(self, z: Tensor) -> Tensor:
        """Images from latents: ``(B, Z)`` float32 -> ``(B, C, H, W)`` float32 in ``[0, 1]``."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor) -> VAEOutput:
        """Encode, sample ``z = mu + sigma * eps`` (``z = mu`` in eval mode), decode.

        :param x: ``(B, C, H, W)`` float32 in ``[0, 1]``.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        logits = self.decode_logits(z)
        return VAEOutput(torch.sigmoid(logits), mu, logvar, z, logits)


def vae_loss(
    out: VAEOutput,
    x: Tensor,
    beta: float = 1.0,
    kl_tolerance: float = 0.0,
    recon_loss: Literal["mse", "bce"] = "mse",
) -> LossTerms:
    """Compute the VAE loss; its scaling is documented in the module docstring.

    :param out: the model's output for ``x``.
    :param x: ``(B, C, H, W)`` float32 targets in ``[0, 1]``.
    :param beta: weight of the (clamped) KL term.
    :param kl_tolerance: free nats per latent dimension (batch-mean KL clamped below it).
    :param recon_loss: ``mse`` (squared error) or ``bce`` (binary cross-entropy, from
        ``out.logits`` when present), summed over pixels.
    """
    if recon_loss == "mse":
        per_pixel = (out.recon - x).square()
    elif out.logits is not None:
        per_pixel = F.binary_cross_entropy_with_logits(out.logits, x, reduction="none")
    else:
        per_pixel = F.binary_cross_entropy(out.recon, x, reduction="none")
    recon = per_pixel.flatten(1).sum(1).mean()
    kl_per_dim = (-0.5 * (1.0 + out.logvar - out.mu.square() - out.logvar.exp())).mean(0)
    kl_clamped = kl_per_dim.clamp(min=kl_tolerance).sum()
    return LossTerms(recon + beta * kl_clamped, recon, kl_per_dim.sum(), kl_per_dim)


def build_vae(vae_cfg: VAEConfig, env_cfg: EnvConfig) -> ConvVAE:
    """Build the model a config describes; input size and channels come from ``env``."""
    return ConvVAE(
        image_size=env_cfg.image_size,
        channels=env_cfg.channels,
        latent_dim=vae_cfg.latent_dim,
        widths=vae_cfg.widths,
        decoder=vae_cfg.decoder,
        broadcast_size=vae_cfg.broadcast_size,
    )


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, bytes), hex."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by the trainer (``weights_only``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise RunNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {first}); it may be "
            "truncated, or hold objects that are refused because loading them could run code"
        ) from e
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{path}: not a VAE checkpoint of this project (no 'model' entry)")
    return data


class LoadedVAE:
    """A trained ConvVAE ready to encode frames; build it with :func:`load_vae`.

    :param model: the network; it is put in eval mode.
    :param config: the VAE run's config (its ``env`` section says what frames it expects).
    :param run_dir: the run folder it came from, if any.

    Example:
        >>> from worldmodel.config import resolve_config
        >>> cfg = resolve_config(None, ["env.image_size=16", "vae.widths=[8]", "vae.latent_dim=4"])
        >>> vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
        >>> vae.encode(np.zeros((5, 16, 16, 3), np.uint8)).shape
        (5, 4)
    """

    def __init__(self, model: ConvVAE, config: Config, run_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.run_dir = run_dir
        self.image_shape: tuple[int, int, int] = (model.image_size, model.image_size,
                                                   model.channels)
        self.latent_dim: int = model.latent_dim

    @functools.cached_property
    def weights_hash(self) -> str:
        """sha256 of the weights (:func:`state_dict_hash`), computed once, on first use.

        Hashing every weight costs time, and most users (validation, image grids) never ask.
        """
        return state_dict_hash(self.model)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def _check_frames(self, frames: np.ndarray | Tensor) -> None:
        shape = tuple(frames.shape)
        want = self.image_shape
        if len(shape) != 4 or shape[1:] != want:
            hint = "; add a batch axis with frames[None]" if shape == want else ""
            raise UserError(
                f"frames of shape {shape} do not fit this VAE, which expects (N, {want[0]}, "
                f"{want[1]}, {want[2]}) uint8 (env.image_size={want[0]}, "
                f"grayscale={want[2] == 1}){hint}"
            )
        if frames.dtype not in (np.uint8, torch.uint8):
            raise UserError(f"frames must be uint8 images in [0, 255], got dtype {frames.dtype}")

    @torch.no_grad()
    def encode(
        self,
        frames: np.ndarray | Tensor,
        mode: Literal["mean", "sample"] = "mean",
        batch_size: int = 256,
    ) -> np.ndarray:
        """Latents of frames, in batches, without gradients.

        :param frames: uint8 ``(N, H, W, C)`` numpy array or tensor.
        :param mode: ``mean`` gives ``mu``; ``sample`` draws ``mu + sigma * eps`` (torch RNG).
        :param batch_size: frames per forward pass.
        :return: float32 ``(N, Z)``.
        """
        self._check_frames(frames)
        out = np.empty((len(frames), self.latent_dim), np.float32)
        for i in range(0, len(frames), batch_size):
            x = frames_to_tensor(frames[i : i + batch_size], self.device)
            mu, logvar = self.model.encode(x)
            if mode == "sample":
                mu = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            out[i : i + len(x)] = mu.cpu().numpy()
        return out

    @torch.no_grad()
    def decode(self, z: np.ndarray | Tensor, batch_size: int = 256) -> np.ndarray:
        """Images from latents.

        :param z: float ``(N, Z)``.
        :return: uint8 ``(N, H, W, C)``.
        """
        zt = torch.as_tensor(np.asarray(z) if not isinstance(z, Tensor) else z)
        if zt.ndim != 2 or zt.shape[1] != self.latent_dim:
            raise UserError(f"latents of shape {tuple(zt.shape)} do not fit this VAE, which "
                            f"expects (N, {self.latent_dim})")
        out = np.empty((len(zt), *self.image_shape), np.uint8)
        for i in range(0, len(zt), batch_size):
            x = self.model.decode(zt[i : i + batch_size].float().to(self.device))
            img = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            out[i : i + len(x)] = img.cpu().numpy()
        return out

    def reconstruct(self, frames: np.ndarray | Tensor, batch_size: int = 256) -> np.ndarray:
        """Encode (mean) and decode: uint8 ``(N, H, W, C)`` -> uint8 ``(N, H, W, C)``."""
        return self.decode(self.encode(frames, batch_size=batch_size), batch_size=batch_size)


def load_vae(
    run_dir: Path,
    checkpoint: Literal["best", "last"] = "best",
    device: torch.device | str = "cpu",
) -> LoadedVAE:
    """Rebuild a trained VAE from its run folder (``config.yaml`` + ``best.pt``/``last.pt``).

    :param run_dir: a ``worldmodel train-vae`` run folder.
    :param checkpoint: ``best`` (lowest validation loss) or ``last``.
    :param device: where to put the model.
    """
    from worldmodel.config import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"VAE run {str(run_dir)!r} not found; pass a train-vae run folder")
    cfg = load_run_config(run_dir)
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} has no {checkpoint}.pt: did its train-vae finish a "
                        "validation step?")
    state = load_checkpoint(path, device)
    model = build_vae(cfg.vae, cfg.env).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not match {run_dir}/config.yaml: {first}") from e
    return LoadedVAE(model, cfg, run_dir)


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    """``torch.save`` ``data`` atomically (readers see the old or the whole new file)."""
    buf = io.BytesIO()
    torch.save(data, buf)

    def write(f: IO[bytes]) -> None:
        f.write(buf.getbuffer())

    atomic_write(path, write)
