"""A picture of the forward process: images and their noised versions at fractions of the schedule."""

import torch
from PIL import Image, ImageDraw

from nanodiffusion.diffusion.forward import q_sample
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.images import image_grid, to_pil

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def forward_process_rows(x0: torch.Tensor, schedule: ScheduleConfig, fractions=FRACTIONS,
                         seed: int = 0) -> torch.Tensor:
    """Return (N, 1 + len(fractions), C, H, W): each image, then x_t at t = fraction·T (one noise per image)."""
    alphas_cumprod = get_alphas_cumprod(schedule)
    T = schedule.num_timesteps
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    columns = [x0]
    for f in fractions:
        t = torch.full((x0.shape[0],), max(round(f * T) - 1, 0))
        columns.append(q_sample(x0, t, noise, alphas_cumprod).clamp(-1, 1))
    return torch.stack(columns, dim=1)


def forward_process_figure(x0: torch.Tensor, schedules: list[ScheduleConfig], fractions=FRACTIONS,
                           seed: int = 0, scale: int = 3) -> Image.Image:
    """A labelled figure: one block of rows per schedule, columns x0 then t = 25/50/75/100 % of T."""
    blocks = []
    for schedule in schedules:
        rows = forward_process_rows(x0, schedule, fractions, seed)
        n, k = rows.shape[:2]
        grid = image_grid(to_pil(rows.flatten(0, 1)), n, k)
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).convert("RGB")
        blocks.append((schedule.kind, grid))
    header, label_w = 16, 100
    width = label_w + blocks[0][1].width
    height = header + sum(g.height for _, g in blocks)
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    cell = blocks[0][1].width / (len(fractions) + 1)
    for j, title in enumerate(["x0"] + [f"t={round(f * 100)}%" for f in fractions]):
        draw.text((label_w + j * cell + 4, 2), title, fill="black")
    y = header
    for kind, grid in blocks:
        draw.text((4, y + grid.height // 2 - 6), kind, fill="black")
        figure.paste(grid, (label_w, y))
        y += grid.height
    return figure
