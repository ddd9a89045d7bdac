"""The two training phases: the VAE on pixels, then the UNet and text encoder on its latents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from paraflow.tools.shapes import random_scenes, render_batch
from paraflow.tools.train.loop import Ema, cosine_lr, run_steps, save_checkpoint, step_generator


def pixels(seed: int, count: int, size: int) -> torch.Tensor:
    """`count` random scenes as a float batch in [-1, 1], (N, 3, size, size)."""
    images = torch.from_numpy(render_batch(random_scenes(seed, count), size))
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(pipe: Any, cfg: DictConfig, out: Path, state: dict[str, Any]) -> None:
    opts, vae = cfg.vae_train, pipe.vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=opts.lr, weight_decay=0.0)
    if state.get("phase") == "vae":
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
    vae.train()

    def step(i: int) -> float:
        gen = step_generator(cfg.seed, "vae", i)
        batch = pixels(int(torch.randint(2**31, (1,), generator=gen)), opts.batch, cfg.image_size)
        top, left = torch.randint(cfg.image_size - opts.crop + 1, (2,), generator=gen).tolist()
        batch = batch[:, :, top:top + opts.crop, left:left + opts.crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        loss = loss + opts.kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(i, opts.steps, opts.lr, warmup=50)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    def checkpoint(done: int) -> None:
        save_checkpoint(out / "checkpoint.pt", {"phase": "vae", "step": done,
                                                "vae": vae.state_dict(),
                                                "optimizer": optimizer.state_dict()})

    start = state.get("step", 0) if state.get("phase") == "vae" else 0
    run_steps("vae", opts.steps, start, step, out / "loss_vae.csv", checkpoint,
              cfg.checkpoint_every)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(pipe: Any, cfg: DictConfig) -> tuple[torch.Tensor, list[str]]:
    """Encode the UNet phase's scenes once (latent means), and set the VAE's scaling factor so
    the latents have unit variance, as Stable Diffusion's 0.18215 does for its VAE."""
    from paraflow.tools.shapes import random_scenes

    scenes = random_scenes(cfg.seed + 1, cfg.unet_train.dataset_size)
    chunks = []
    for start in range(0, len(scenes), 256):
        images = render_batch(scenes[start:start + 256], cfg.image_size)
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        chunks.append(pipe.vae.encode(batch).latent_dist.mean)
    latents = torch.cat(chunks)
    pipe.vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * pipe.vae.config.scaling_factor, [s.caption for s in scenes]


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the epsilon loss: min(SNR, gamma) / SNR."""
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(pipe: Any, cfg: DictConfig, out: Path,
               state: dict[str, Any]) -> dict[str, Any] | None:
    """Train the UNet and text encoder together; returns their EMA copies (None when the run
    stopped early at `stop_after`, to be resumed)."""
    opts, unet, text = cfg.unet_train, pipe.unet, pipe.text_encoder
    if "scaling_factor" in state:
        pipe.vae.register_to_config(scaling_factor=state["scaling_factor"])
    latents, captions = encode_dataset(pipe, cfg)
    empty = np.array([""])
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    ema_unet, ema_text = Ema(unet, opts.ema_decay), Ema(text, opts.ema_decay)
    if state.get("phase") == "unet":
        for module, key in ((unet, "unet"), (text, "text_encoder"), (ema_unet.module, "ema_unet"),
                            (ema_text.module, "ema_text_encoder"), (optimizer, "optimizer")):
            module.load_state_dict(state[key])
    unet.train()
    text.train()
    noise_scheduler = pipe.scheduler
    captions_array = np.array(captions)

    def tokens(texts: list[str]) -> torch.Tensor:
        return pipe.tokenizer(texts, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids

    def step(i: int) -> float:
        gen = step_generator(cfg.seed, "unet", i)
        index = torch.randint(len(latents), (opts.batch,), generator=gen)
        dropped = torch.rand(opts.batch, generator=gen) < opts.caption_dropout
        texts = np.where(dropped.numpy(), empty, captions_array[index.numpy()]).tolist()
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (opts.batch,),
                                  generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        condition = text(tokens(texts))[0]
        predicted = unet(noisy, timesteps, condition).sample
        per_sample = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(noise_scheduler, timesteps,
                                             opts.min_snr_gamma)).mean()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(i, opts.steps, opts.lr, opts.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet, i)
        ema_text.update(text, i)
        return loss.item()

    def checkpoint(done: int) -> None:
        save_checkpoint(out / "checkpoint.pt", {
            "phase": "unet", "step": done, "vae": pipe.vae.state_dict(),
            "scaling_factor": pipe.vae.config.scaling_factor, "unet": unet.state_dict(),
            "text_encoder": text.state_dict(), "ema_unet": ema_unet.module.state_dict(),
            "ema_text_encoder": ema_text.module.state_dict(), "optimizer": optimizer.state_dict()})

    start = state.get("step", 0) if state.get("phase") == "unet" else 0
    if not run_steps("unet", opts.steps, start, step, out / "loss_unet.csv", checkpoint,
                     cfg.checkpoint_every, cfg.stop_after):
        return None
    return {"unet": ema_unet.module, "text_encoder": ema_text.module}
