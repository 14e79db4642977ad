"""``VAEFeaturesExtractor``: the VAE's encoder inside an SB3 policy, trained with its loss.

For ``agent.obs_mode: latent-finetune``. It plugs in the way SB3 users expect::

    model = PPO("CnnPolicy", env, policy_kwargs=dict(
        features_extractor_class=VAEFeaturesExtractor,
        features_extractor_kwargs=dict(vae_run="runs/my-vae")))

The policy sees pixels (SB3 transposes them to ``(history * C, H, W)`` and scales them to
``[0, 1]``); the extractor splits the stacked frames, encodes each with the VAE's conv encoder and
``mu`` head, and concatenates: ``(B, history * Z)`` features, the same vector the ``latent`` mode
observes, but now with gradients. The output size is found by a dummy forward pass, as in SB3's
``NatureCNN``. Only the encoder half of the VAE is kept (no decoder in the policy).

SB3's ``ortho_init`` re-initialises a features extractor through ``Module.apply``; an extractor
built from a VAE run ignores ``apply`` so that it really starts from the VAE's weights.

If the encoder is to stay frozen, SB3's maintainers advise a wrapper instead (cheaper): use
:class:`agents.latent.VecLatentObservation` (``obs_mode: latent``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from agents.latent import get_vae


class VAEFeaturesExtractor(BaseFeaturesExtractor):
    """A VAE encoder as an SB3 features extractor: ``(B, k*C, H, W)`` in [0, 1] -> ``(B, k*Z)``.

    :param observation_space: the policy's (channels-first) image space, ``k`` stacked frames.
    :param vae_run: a ``worldmodel train-vae`` run folder: the encoder starts from its weights
        (and its architecture wins over ``latent_dim``/``widths``/``channels``). ``None`` builds
        a freshly initialised encoder of the given architecture (used when loading a saved
        policy, whose own weights then replace it).
    :param checkpoint: which checkpoint of ``vae_run``.
    :param latent_dim: ``Z`` when ``vae_run`` is ``None``.
    :param widths: encoder conv channels when ``vae_run`` is ``None``.
    :param channels: channels ``C`` of one frame when ``vae_run`` is ``None`` (default: all the
        observation's channels, i.e. no stacking).
    :param latent: ``mean`` uses ``mu``; ``sample`` draws ``mu + sigma * eps`` (reparameterised).

    Example:
        >>> import numpy as np
        >>> space = spaces.Box(0, 255, (6, 16, 16), np.uint8)  # 2 stacked RGB frames
        >>> ex = VAEFeaturesExtractor(space, latent_dim=4, widths=[8], channels=3)
        >>> ex.features_dim, tuple(ex(torch.zeros(5, 6, 16, 16)).shape)
        (8, (5, 8))
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        vae_run: str | Path | None = None,
        checkpoint: Literal["best", "last"] = "best",
        latent_dim: int = 32,
        widths: Sequence[int] = (32, 64, 128, 256),
        channels: int | None = None,
        latent: Literal["mean", "sample"] = "mean",
    ) -> None:
        from worldmodel.vae import ConvVAE

        super().__init__(observation_space, features_dim=1)
        shape = observation_space.shape
        if shape is None or len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"expected a square channels-first image space, got {shape}")
        self.pretrained = vae_run is not None
        self.weights_hash: str | None = None
        if vae_run is not None:
            vae = get_vae(vae_run, checkpoint)
            model = copy.deepcopy(vae.model).cpu()
            self.weights_hash = vae.weights_hash
        else:
            model = ConvVAE(shape[1], channels or shape[0], latent_dim, widths)
        if model.image_size != shape[1] or shape[0] % model.channels:
            raise ValueError(
                f"observations {shape} are not stacks of the encoder's "
                f"{model.channels}x{model.image_size}x{model.image_size} frames"
            )
        self.channels = model.channels
        self.image_size = model.image_size
        self.latent_dim = model.latent_dim
        self.widths = model.widths
        self.history = shape[0] // model.channels
        self.latent = latent
        #: conv encoder ``(N, C, H, W)`` -> ``(N, F)``; heads ``(N, F)`` -> ``(N, Z)``.
        self.encoder = model.encoder
        self.fc_mu = model.fc_mu
        self.fc_logvar = model.fc_logvar
        with torch.no_grad():
            n_features = self(torch.zeros((1, *shape))).shape[1]
        self._features_dim = int(n_features)

    def encode_frames(self, x: Tensor) -> Tensor:
        """Single frames ``(N, C, H, W)`` float32 in [0, 1] -> ``mu`` (or a sample) ``(N, Z)``."""
        h = self.encoder(x)
        mu = self.fc_mu(h)
        if self.latent == "sample":
            mu = mu + torch.randn_like(mu) * torch.exp(0.5 * self.fc_logvar(h))
        return mu

    def forward(self, observations: Tensor) -> Tensor:
        """``(B, k*C, H, W)`` float32 in [0, 1] -> ``(B, k*Z)``, oldest frame's latent first."""
        b, kc, h, w = observations.shape
        z = self.encode_frames(observations.reshape(b * (kc // self.channels), self.channels, h, w))
        return z.reshape(b, -1)

    def apply(self, fn: Callable[[nn.Module], None]) -> VAEFeaturesExtractor:
        """``Module.apply``, except that an encoder built from a VAE run keeps its weights.

        SB3's ``ortho_init`` calls ``features_extractor.apply(init_weights)``, which would throw
        away the pretrained VAE weights this extractor exists to start from.
        """
        if self.pretrained:
            return self
        super().apply(fn)
        return self


def vae_extractors(module: nn.Module) -> list[VAEFeaturesExtractor]:
    """Every :class:`VAEFeaturesExtractor` inside a policy (actor, critic, target copies)."""
    return [m for m in module.modules() if isinstance(m, VAEFeaturesExtractor)]
