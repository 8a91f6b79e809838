"""A few-step model distilled from the digits model: the teacher's guided 40-step sampler in
four steps, with no guidance pass (``fleet model distill digits``).

The method is trajectory distillation, the idea of progressive distillation (Salimans & Ho,
2022) taken from 40 steps to 4 in one round, with classifier-free guidance distilled in
(Meng et al., 2023):

1. The teacher (the shipped digits model) samples ``trajectories`` images with DDIM over 40
   "trailing" timesteps at guidance 3, from seeded noise and random digit prompts. Its
   latents are kept where the student's four steps will be: t = 999, 749, 499, 249, and the
   end.
2. The student starts as a copy of the teacher's UNet. From each kept latent it learns the
   noise prediction whose DDIM step lands on the teacher's next kept latent (a closed form:
   the one DDIM update that joins the two). Its loss is weighted by max(SNR, 1), as
   progressive distillation's is, so the low-noise steps count as much as the first.

The student is an ordinary ``StableDiffusionPipeline`` directory (the teacher's tokenizer,
text encoder and autoencoder, the new UNet) whose scheduler is DDIM with ``trailing``
spacing: at 4 steps it visits exactly the timesteps the student learnt, and it needs no
guidance (``guidance_scale`` 1: one UNet pass per step, not two). It serves 4 steps only:
at another count it visits timesteps it never learnt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline

from workers.digits_data import SEED, TEMPLATES, prompt

#: the steps the student samples in; the only count it serves
STUDENT_STEPS = 4
#: the teacher's sampler: DDIM over this many trailing timesteps (a multiple of STUDENT_STEPS,
#: so the student's timesteps are among the teacher's) at this guidance
TEACHER_STEPS = 40
TEACHER_GUIDANCE = 3.0


@dataclass(frozen=True)
class DistillPlan:
    """How much the distillation does, in trajectories and optimizer steps."""

    trajectories: int = 2048
    train_steps: int = 1000
    batch: int = 128
    lr: float = 5e-4
    teacher_batch: int = 256


def trailing_ddim(config: Any) -> Any:
    """DDIM with trailing spacing: the student's sampler (4 steps: t = 999, 749, 499, 249) and
    the teacher's (40 steps, the student's among them;
    trailing spacing ignores ``steps_offset``, which stays SD's 1, as pipelines insist)."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing")


@dataclass(frozen=True)
class DDIMJoin:
    """The student's DDIM steps as ``x_next = a * x_t + b * eps``, one ``(a, b)`` per step:
    so the noise prediction that lands a step on a given ``x_next`` is
    ``(x_next - a * x_t) / b``."""

    timesteps: torch.Tensor  # (STUDENT_STEPS,) int64
    alpha_t: torch.Tensor  # the cumulative alpha at each timestep
    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def of(cls, sampler: Any, steps: int = STUDENT_STEPS) -> DDIMJoin:
        """From the student's sampler (a ``DDIMScheduler``: diffusers types its attributes
        at run time, hence ``Any``)."""
        sampler.set_timesteps(steps)
        timesteps = sampler.timesteps.long()
        alpha_t = sampler.alphas_cumprod[timesteps]
        alpha_next = torch.cat([sampler.alphas_cumprod[timesteps[1:]], sampler.final_alpha_cumprod.reshape(1)])
        a = (alpha_next / alpha_t).sqrt()
        b = (1 - alpha_next).sqrt() - (alpha_next * (1 - alpha_t) / alpha_t).sqrt()
        return cls(timesteps, alpha_t, a, b)

    def noise_to(self, k: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """The noise prediction whose step ``k`` from ``x_t`` lands on ``x_next``."""
        return (x_next - self.a[k].view(-1, 1, 1, 1) * x_t) / self.b[k].view(-1, 1, 1, 1)


def write_model(
    teacher_dir: Path,
    directory: Path,
    plan: DistillPlan = DistillPlan(),
    on_step: Callable[[str, int, int, float], None] | None = None,
) -> None:
    """Distill the model at ``teacher_dir`` and write the student to ``directory``."""
    from workers.model_init import save_pipeline

    save_pipeline(distill(teacher_dir, plan, on_step), directory)


def distill(
    teacher_dir: Path, plan: DistillPlan = DistillPlan(), on_step: Callable[[str, int, int, float], None] | None = None
) -> Any:
    """The student pipeline; ``on_step(stage, step, total, loss)`` after each teacher batch
    and each optimizer step (a progress bar)."""
    report = on_step or (lambda *_: None)
    teacher = StableDiffusionPipeline.from_pretrained(str(teacher_dir), local_files_only=True)
    teacher.set_progress_bar_config(disable=True)
    context, path = _trajectories(teacher, plan, report)  # path: (kept + 1, n, 4, 8, 8)

    join = DDIMJoin.of(trailing_ddim(teacher.scheduler.config))
    weight = (join.alpha_t / (1 - join.alpha_t)).clamp(min=1.0)  # max(SNR, 1)

    student = teacher.unet
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=plan.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / plan.train_steps)
    generator = torch.Generator().manual_seed(SEED)
    n = path.shape[1]
    for step in range(plan.train_steps):
        index = torch.randint(0, n, (plan.batch,), generator=generator)
        k = torch.randint(0, STUDENT_STEPS, (plan.batch,), generator=generator)
        x_t, x_next = path[k, index], path[k + 1, index]
        target = join.noise_to(k, x_t, x_next)
        t = join.timesteps[k]
        predicted = student(x_t, t, encoder_hidden_states=context[index]).sample
        per_image = F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_image * weight[k]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        report("student", step + 1, plan.train_steps, float(loss.detach()))
    student.eval()
    teacher.scheduler = trailing_ddim(teacher.scheduler.config)
    return teacher


def _trajectories(
    teacher: Any, plan: DistillPlan, report: Callable[[str, int, int, float], None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's guided DDIM paths from seeded noise: the prompts' text embeddings
    (n, 32, 64) and the latents at each student timestep and the end (5, n, 4, 8, 8)."""
    rng = random.Random(SEED)
    captions = [prompt(rng.randrange(10), rng.choice(TEMPLATES)) for _ in range(plan.trajectories)]
    sampler = trailing_ddim(teacher.scheduler.config)
    sampler.set_timesteps(TEACHER_STEPS)
    keep_every = TEACHER_STEPS // STUDENT_STEPS
    generator = torch.Generator().manual_seed(SEED + 1)
    contexts, paths = [], []
    batches = range(0, plan.trajectories, plan.teacher_batch)
    with torch.inference_mode():
        empty = _encode(teacher, [""])
        for number, start in enumerate(batches):
            text = _encode(teacher, captions[start : start + plan.teacher_batch])
            size = len(text)
            latents = torch.randn((size, 4, 8, 8), generator=generator)
            kept = [latents]
            both = torch.cat([empty.expand(size, -1, -1), text])
            for i, t in enumerate(sampler.timesteps):
                eps_empty, eps_text = teacher.unet(
                    torch.cat([latents] * 2), t, encoder_hidden_states=both
                ).sample.chunk(2)
                eps = eps_empty + TEACHER_GUIDANCE * (eps_text - eps_empty)
                latents = sampler.step(eps, t, latents).prev_sample
                if (i + 1) % keep_every == 0:
                    kept.append(latents)
            contexts.append(text)
            paths.append(torch.stack(kept))
            report("teacher", number + 1, len(batches), 0.0)
    return torch.cat(contexts).clone(), torch.cat(paths, dim=1).clone()


def _encode(pipe: Any, texts: list[str]) -> torch.Tensor:
    tokens = pipe.tokenizer(
        texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(tokens)[0]
