"""The memory model M: an MDN-RNN that predicts the next latent, the reward and the end.

World Models (Ha & Schmidhuber 2018, https://worldmodels.github.io; hardmaru's
``carracing/rnn/rnn.py`` in https://github.com/hardmaru/WorldModelsExperiments) gives M an
LSTM over the input ``[z_t, a_t]`` whose output parametrises a mixture of ``K`` Gaussians *per
latent dimension* for ``z_{t+1}`` (CarRacing: 256 hidden units, ``K = 5``). The Doom M adds a
done head (its loss weighted 10); ctallec's MDRNN (https://github.com/ctallec/world-models,
``models/mdrnn.py``) adds a reward head (MSE) and a done head (binary cross-entropy). This M has
all three heads::

    h_t = LSTM([z_t, a_t], h_{t-1})                      (B, L, H)
    logits, mu, logsigma = split(W h_t)                  each (B, L, Z, K)
    p(z_{t+1, j}) = sum_k softmax(logits_j)_k N(mu_jk, exp(logsigma_jk)^2)
    reward_t = w_r h_t * std_r + mean_r                  (B, L)
    p(done_t) = sigmoid(w_d h_t)                         (B, L)

``reward_t`` and ``done_t`` are those of the action ``a_t`` (the dataset's ``reward`` and
``terminated`` of step ``t``). The dream (World Models, section "Training inside of the dream")
samples with a temperature ``tau``: the mixture logits are divided by ``tau`` and the Gaussian's
noise is scaled by ``sqrt(tau)`` (:meth:`LoadedMemory.sample`).

Actions enter as float32 vectors: ``Box`` actions flattened, ``Discrete`` ones one-hot
(:func:`action_dim`, :func:`encode_actions`).

Example:
    >>> m = MDNRNN(latent_dim=3, action_dim=2, hidden_size=8, mixtures=2)
    >>> out, state = m(torch.zeros(4, 5, 3), torch.zeros(4, 5, 2))
    >>> tuple(out.mu.shape), tuple(out.reward.shape), tuple(state[0].shape)
    ((4, 5, 3, 2), (4, 5), (1, 4, 8))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.errors import RunNotFoundError, UserError

if TYPE_CHECKING:
    from worldmodel.config import Config, MemoryConfig

__all__ = [
    "MDNRNN",
    "LoadedMemory",
    "MemoryOutput",
    "action_dim",
    "build_memory",
    "encode_actions",
    "load_memory",
    "mdn_loss",
    "mixture_mean",
]

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
#: ``logsigma`` is clamped to this range: a collapsing Gaussian would make the NLL -inf.
LOGSIGMA_RANGE = (-7.0, 5.0)

State = tuple[Tensor, Tensor]


class MemoryOutput(NamedTuple):
    """What :class:`MDNRNN` predicts for each input step (all float32 tensors).

    Shapes are for a sequence batch ``(B, L, ...)``; :meth:`LoadedMemory.step` returns the same
    fields without the ``L`` axis.

    :param logits: ``(B, L, Z, K)``, unnormalised mixture weights per latent dimension.
    :param mu: ``(B, L, Z, K)``, the Gaussians' means for ``z_{t+1}``.
    :param logsigma: ``(B, L, Z, K)``, their log standard deviations.
    :param reward: ``(B, L)``, the predicted reward of the step.
    :param done: ``(B, L)``, the done head's logit (``sigmoid(done)`` is ``p(done)``).
    """

    logits: Tensor
    mu: Tensor
    logsigma: Tensor
    reward: Tensor
    done: Tensor

    @property
    def done_prob(self) -> Tensor:
        """``p(done)``, the sigmoid of :attr:`done`."""
        return torch.sigmoid(self.done)


class MDNRNN(nn.Module):
    """LSTM over ``[z_t, a_t]`` with mixture, reward and done heads (see the module docstring).

    :param latent_dim: ``Z``.
    :param action_dim: ``A``, the size of an action vector (:func:`action_dim`).
    :param hidden_size: ``H``, LSTM units.
    :param mixtures: ``K``, Gaussians per latent dimension.
    """

    reward_mean: Tensor  # () float32 buffer
    reward_std: Tensor  # () float32 buffer

    def __init__(self, latent_dim: int, action_dim: int, hidden_size: int = 256,
                 mixtures: int = 5) -> None:
        super().__init__()
        self.latent_dim, self.action_dim = latent_dim, action_dim
        self.hidden_size, self.mixtures = hidden_size, mixtures
        self.lstm = nn.LSTM(latent_dim + action_dim, hidden_size, batch_first=True)
        self.mdn = nn.Linear(hidden_size, 3 * latent_dim * mixtures)
        self.reward = nn.Linear(hidden_size, 1)
        self.done = nn.Linear(hidden_size, 1)
        # The reward head predicts standardised rewards, (r - reward_mean) / reward_std, with
        # the training split's statistics (set by train-memory, saved with the weights): a
        # reward of Reach's scale (std ~0.01) next to the mixture NLL would otherwise be ignored.
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    def forward(self, z: Tensor, action: Tensor,
                state: State | None = None) -> tuple[MemoryOutput, State]:
        """Predict for every step of a batch of sequences.

        :param z: ``(B, L, Z)`` float32 latents ``z_t``.
        :param action: ``(B, L, A)`` float32 action vectors ``a_t``.
        :param state: ``(h, c)``, each ``(1, B, H)``; ``None`` starts from zeros.
        :return: the predictions for ``z_{t+1}``, ``r_t``, ``done_t``, and the final state.
        """
        h, state = self.lstm(torch.cat([z, action], dim=-1), state)
        b, length = h.shape[:2]
        params = self.mdn(h).view(b, length, self.latent_dim, 3, self.mixtures)
        logits, mu, logsigma = params.unbind(dim=3)
        reward = self.reward(h).squeeze(-1) * self.reward_std + self.reward_mean
        out = MemoryOutput(logits, mu, logsigma.clamp(*LOGSIGMA_RANGE), reward,
                           self.done(h).squeeze(-1))
        return out, state


def mdn_loss(out: MemoryOutput, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood of ``target`` per latent dimension (nats), with logsumexp.

    ``-log sum_k pi_k N(target; mu_k, sigma_k)``, computed as ``-logsumexp_k(log_softmax(logits)_k
    + log N_k)`` so that no density is ever exponentiated (stable for tiny sigmas and far
    targets), averaged over latent dimensions and over the steps ``mask`` keeps.

    :param out: the predictions, fields ``(..., Z, K)``.
    :param target: ``(..., Z)`` float32, the latents ``z_{t+1}``.
    :param mask: ``(...)`` bool or float, the steps that have a target (``None``: all).
    :return: a scalar float32 tensor.
    """
    log_pi = F.log_softmax(out.logits, dim=-1)
    x = target.unsqueeze(-1)
    log_normal = (-0.5 * ((x - out.mu) * torch.exp(-out.logsigma)).square() - out.logsigma
                  - LOG_SQRT_2PI)
    nll = -torch.logsumexp(log_pi + log_normal, dim=-1).mean(-1)  # (...) per step
    if mask is None:
        return nll.mean()
    m = mask.to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1.0)


def mixture_mean(out: MemoryOutput) -> Tensor:
    """The expected value of the mixture, ``sum_k pi_k mu_k``: ``(..., Z, K)`` -> ``(..., Z)``.

    The prediction of ``z_{t+1}`` with the lowest expected squared error (what the open-loop
    metrics of ``train-memory`` feed back).
    """
    return (F.softmax(out.logits, dim=-1) * out.mu).sum(-1)


def build_memory(memory_cfg: MemoryConfig, latent_dim: int, action_dim: int) -> MDNRNN:
    """The M a config describes, for latents of ``latent_dim`` and actions of ``action_dim``."""
    return MDNRNN(latent_dim, action_dim, memory_cfg.hidden_size, memory_cfg.mixtures)


# --------------------------------------------------------------------------------------------
# Actions as vectors


def action_dim(space: dict[str, Any] | None) -> int:
    """The size of the action vector M reads, from a dataset manifest's ``action_space``.

    :raise UserError: no action space recorded, or one M cannot read.

    Example:
        >>> action_dim({"type": "Discrete", "n": 5, "start": 0})
        5
        >>> action_dim({"type": "Box", "shape": [3]})
        3
    """
    kind = space.get("type") if isinstance(space, dict) else None
    if kind == "Discrete":
        return int(space["n"])  # type: ignore[index]
    if kind == "MultiDiscrete":
        return int(sum(space["nvec"]))  # type: ignore[index]
    if kind == "Box":
        return int(np.prod(space["shape"]))  # type: ignore[index]
    raise UserError(
        f"the dataset records no action space M can read ({kind or 'none'}); the memory model "
        "needs Box, Discrete or MultiDiscrete actions"
    )


def encode_actions(actions: np.ndarray, space: dict[str, Any]) -> np.ndarray:
    """Dataset actions as the float32 vectors M reads: ``(N, *A)`` -> ``(N, action_dim)``.

    ``Box``: flattened; ``Discrete``: one-hot of ``a - start``; ``MultiDiscrete``: one one-hot
    per component, concatenated.

    Example:
        >>> encode_actions(np.array([0, 2]), {"type": "Discrete", "n": 3, "start": 0})
        array([[1., 0., 0.],
               [0., 0., 1.]], dtype=float32)
    """
    a = np.asarray(actions)
    n = len(a)
    kind = space["type"]
    if kind == "Box":
        return a.reshape(n, -1).astype(np.float32)
    if kind == "Discrete":
        return np.eye(int(space["n"]), dtype=np.float32)[a.reshape(n) - int(space.get("start", 0))]
    if kind == "MultiDiscrete":
        parts = [np.eye(int(k), dtype=np.float32)[a.reshape(n, -1)[:, i]]
                 for i, k in enumerate(space["nvec"])]
        return np.concatenate(parts, axis=1)
    action_dim(space)  # raises the one-line error
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------
# Loading a trained M


class LoadedMemory:
    """A trained M ready to step, batched; build it with :func:`load_memory`.

    :param model: the network; it is put in eval mode.
    :param config: the memory run's config (``memory.temperature`` is the default ``tau``).
    :param action_space: the dataset's ``action_space`` (how actions become vectors).
    :param run_dir: the run folder it came from, if any.

    Example (an untrained M):
        >>> from worldmodel.config import resolve_config
        >>> cfg = resolve_config(None, ["memory.hidden_size=8", "memory.mixtures=2"])
        >>> space = {"type": "Discrete", "n": 5, "start": 0}
        >>> mem = LoadedMemory(build_memory(cfg.memory, 4, 5), cfg, space)
        >>> state = mem.initial_state(3)
        >>> a = torch.as_tensor(mem.actions(np.array([0, 1, 4])))
        >>> pred, state = mem.step(torch.zeros(3, 4), a, state)
        >>> tuple(pred.mu.shape), tuple(mem.sample(pred, tau=0.5).shape)
        ((3, 4, 2), (3, 4))
    """

    def __init__(self, model: MDNRNN, config: Config, action_space: dict[str, Any],
                 run_dir: Path | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.action_space = action_space
        self.run_dir = run_dir
        self.latent_dim: int = model.latent_dim
        self.action_dim: int = model.action_dim
        self.hidden_size: int = model.hidden_size
        self.mixtures: int = model.mixtures
        self.temperature: float = config.memory.temperature

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    def actions(self, actions: np.ndarray) -> np.ndarray:
        """Env actions ``(B, *A)`` as float32 vectors ``(B, action_dim)`` (Discrete: one-hot)."""
        return encode_actions(actions, self.action_space)

    def initial_state(self, batch: int) -> State:
        """The LSTM state before the first step: ``(h, c)``, each ``(1, B, H)`` float32 zeros."""
        zeros = torch.zeros(1, batch, self.hidden_size, device=self.device)
        return zeros, zeros.clone()

    @torch.no_grad()
    def step(self, z: Tensor | np.ndarray, action: Tensor | np.ndarray,
             state: State) -> tuple[MemoryOutput, State]:
        """One step of ``B`` independent sequences.

        :param z: ``(B, Z)`` float32, the current latents (a tensor or a NumPy array, such as
            ``LoadedVAE.encode`` returns).
        :param action: ``(B, A)`` float32 action vectors (:meth:`actions`; tensor or array).
        :param state: ``(h, c)`` from :meth:`initial_state` or the previous step.
        :return: the prediction (``logits``, ``mu``, ``logsigma``: ``(B, Z, K)`` float32;
            ``reward``, ``done`` logit: ``(B,)`` float32; ``done_prob`` ``(B,)``), the new state.
        """
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise UserError(f"latents of shape {tuple(z.shape)} do not fit this memory, which "
                            f"expects (B, {self.latent_dim})")
        if action.ndim != 2 or action.shape != (z.shape[0], self.action_dim):
            raise UserError(f"actions of shape {tuple(action.shape)} do not fit this memory, "
                            f"which expects ({z.shape[0]}, {self.action_dim}) float32 vectors "
                            "(Discrete actions one-hot: LoadedMemory.actions)")
        out, state = self.model(z[:, None], action[:, None], state)
        return MemoryOutput(*(t[:, 0] for t in out)), state

    def sample(self, prediction: MemoryOutput, tau: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``z_{t+1}`` with temperature ``tau`` (World Models' dream).

        Per latent dimension a component is drawn from ``softmax(logits / tau)`` and then
        ``mu + sigma * sqrt(tau) * eps``; ``tau -> 0`` gives the most likely component's mean.

        :param prediction: from :meth:`step` (fields ``(B, Z, K)``).
        :param tau: the temperature (> 0); ``None``: ``memory.temperature`` of the run.
        :param generator: the torch generator to draw from (``None``: the global one).
        :return: ``(B, Z)`` float32.
        """
        tau = self.temperature if tau is None else float(tau)
        if not tau > 0:
            raise UserError(f"the temperature must be > 0, got {tau}")
        probs = F.softmax(prediction.logits / tau, dim=-1)
        b, z, k = probs.shape
        pick = torch.multinomial(probs.reshape(b * z, k), 1, generator=generator).view(b, z, 1)
        mu = prediction.mu.gather(-1, pick).squeeze(-1)
        sigma = prediction.logsigma.gather(-1, pick).squeeze(-1).exp()
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * math.sqrt(tau) * eps


def load_memory(
    run_dir: Path,
    checkpoint: Literal["best", "last"] = "best",
    device: torch.device | str = "cpu",
) -> LoadedMemory:
    """Rebuild a trained M from its run folder (``config.yaml`` + ``best.pt``/``last.pt``).

    The checkpoint is read with ``torch.load(weights_only=True)``
    (:func:`worldmodel.vae.load_checkpoint`); it records the latent and action sizes and the
    dataset's action space.

    :param run_dir: a ``worldmodel train-memory`` run folder.
    :param checkpoint: ``best`` (lowest validation NLL) or ``last``.
    :param device: where to put the model.
    """
    from worldmodel.config import load_run_config
    from worldmodel.runfolder import require_kind
    from worldmodel.vae import load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"memory run {str(run_dir)!r} not found; pass a train-memory run "
                               "folder")
    require_kind(run_dir, "memory", "the memory run")
    cfg = load_run_config(run_dir)
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} has no {checkpoint}.pt: did its train-memory finish a "
                        "validation step?")
    state = load_checkpoint(path, device)
    import json

    space = json.loads(str(state["action_space"]))
    model = build_memory(cfg.memory, int(state["latent_dim"]), int(state["action_dim"]))
    # runs saved before the reward head was standardised have no reward statistics
    weights = {**model.state_dict(), **state["model"]}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not match {run_dir}/config.yaml: {first}") from e
    return LoadedMemory(model.to(device), cfg, space, run_dir)
