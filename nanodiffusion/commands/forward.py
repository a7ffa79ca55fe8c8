"""Draw dataset images and their noised versions at 25/50/75/100 % of the schedule, one block per schedule."""

import torch

from nanodiffusion.atomic import check_output_file
from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.diffusion.schedules import SCHEDULE_DEFAULTS, ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.images import save_png
from nanodiffusion.pipelines.forward_figure import forward_process_figure
from nanodiffusion.validation import check_seed


def add_arguments(p) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="mnist, fashion-mnist or a folder of images")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("--schedule", nargs="+", default=["linear", "cosine"], choices=list(SCHEDULE_DEFAULTS),
                   help="noise schedules to compare")
    p.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    p.add_argument("-n", "--num-images", type=int, default=6, help="dataset images to show")
    p.add_argument("--image-size", type=int, help="resize images to this size (folders)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of images and the noise")
    p.add_argument("--out", default="forward.png", help="output PNG")


def run(args) -> None:
    if args.num_images < 1:
        raise UserError(f"-n must be >= 1, got {args.num_images}")
    check_seed(args.seed, name="--seed")
    check_output_file(args.out, "--out", suffix=".png")
    dataset = load_dataset(args.dataset, image_size=args.image_size, data_dir=args.data_dir)
    if args.num_images > len(dataset):
        raise UserError(f"-n {args.num_images} is more than the {len(dataset)} images of {args.dataset}")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(dataset), generator=g)[:args.num_images]
    x0, _ = dataset.batch(idx)
    schedules = [ScheduleConfig(kind, args.timesteps) for kind in args.schedule]
    save_png(forward_process_figure(x0, schedules, seed=args.seed), args.out)
    print(f"wrote {args.out}")
