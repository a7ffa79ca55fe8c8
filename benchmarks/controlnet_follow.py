"""How well a Canny ControlNet makes the built-in model follow an edge map (issue 16's demonstration).

Held-out shapes scenes (a seed the training never drew) give a caption and an edge map each; the model draws
each scene without and with the ControlNet (same seeds), prompted by its caption (which already says roughly
where the shapes are) and by the empty prompt (only the map can say it). The Canny edges of each picture are
compared with the map: precision (drawn edges that lie on the map, within 1 pixel), recall (map edges that
were drawn, within 1 pixel) and their harmonic mean F1. `--grid` writes the docs' picture: maps, without,
with (captioned).

    python benchmarks/controlnet_follow.py --controlnet runs/controlnet/controlnet [--num 64] [--grid PNG]
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HELD_OUT_SEED = 12_345                  # training draws its scenes from seed 0 (train --seed)


def edge_scores(drawn: np.ndarray, wanted: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of edge maps `drawn` against `wanted` ((N, H, W) bool), 1 pixel tolerance."""
    def near(edges: np.ndarray) -> np.ndarray:                 # every pixel within 1 of an edge
        return F.max_pool2d(torch.from_numpy(edges).float()[:, None], 3, 1, 1)[:, 0].numpy() > 0

    precision = (drawn & near(wanted)).sum() / max(drawn.sum(), 1)
    recall = (wanted & near(drawn)).sum() / max(wanted.sum(), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlnet", required=True, help="the ControlNet folder `train controlnet` wrote")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--num", type=int, default=64, help="held-out scenes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid", help="also write maps / without / with for the first 8 scenes here")
    args = parser.parse_args()
    from nanodiffusion.control_images.canny import edge_maps
    from nanodiffusion.data.captioned import shapes_captioned
    from nanodiffusion.images import image_grid, save_png, to_pil
    from nanodiffusion.pipelines.text_to_image import TextToImage
    from nanodiffusion.weights.models import model_path

    pipe = TextToImage.from_pretrained(model_path(args.model))
    pipe.show_progress = False
    data = shapes_captioned(args.num, pipe.native_size, HELD_OUT_SEED)
    wanted = edge_maps(data.images.numpy()) > 0                                   # (N, H, W)
    captions = [data.caption(i) for i in range(args.num)]
    drawn = {(prompt, control): [] for prompt in ("caption", "empty prompt")
             for control in ("without", "with")}
    start = time.perf_counter()
    for first in range(0, args.num, args.batch):
        items = slice(first, first + args.batch)
        maps = torch.from_numpy(wanted[items]).float()[:, None].expand(-1, 3, -1, -1)
        for (prompt, control), images in drawn.items():
            pipe.controlnets.clear()
            extra = {}
            if control == "with":
                pipe.load_controlnet(args.controlnet)
                extra = {"control_image": maps}
            prompts = captions[items] if prompt == "caption" else [""] * len(captions[items])
            images.extend(pipe(prompts, seed=first, output_type="np", **extra).images)
    print(f"{time.strftime('%Y-%m-%d')}: {args.num} held-out scenes, {pipe.generation_defaults or 'SD'} "
          f"defaults, {time.perf_counter() - start:.0f} s\n")
    print(f"{'prompt':<14}{'ControlNet':<12}{'precision':>10}{'recall':>8}{'F1':>7}")
    for (prompt, control), images in drawn.items():
        pixels = (np.stack(images) * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)   # (N, 3, H, W)
        scores = edge_scores(edge_maps(pixels) > 0, wanted)
        print(f"{prompt:<14}{control:<12}" + "".join(f"{s:>{w}.3f}" for s, w in zip(scores, (10, 8, 7))))
    if args.grid:
        count = min(8, args.num)
        maps = [to_pil(torch.from_numpy(wanted[i]).float()[None, None].expand(-1, 3, -1, -1) * 2 - 1)[0]
                for i in range(count)]
        rows = [to_pil(torch.from_numpy(np.stack(drawn["caption", name][:count])).permute(0, 3, 1, 2)
                       * 2 - 1) for name in ("without", "with")]
        grid = image_grid([*maps, *rows[0], *rows[1]], rows=3, cols=count)
        save_png(grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST), args.grid)   # 32 px is small
        print(f"\nwrote {args.grid}: edge maps, without, with; captions: {captions[:count]}")


if __name__ == "__main__":
    main()
