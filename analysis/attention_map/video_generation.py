"""Attention maps for every frame of a video (official ``analysis/attention_map/video_generation.py``,
evaluation.md §3.2).

    python analysis/attention_map/video_generation.py --arch vit_small --patch_size 8 \
        --pretrained_weights ckpt.pth --input_path frames_dir/ --output_path out/ --fps 25
    python analysis/attention_map/video_generation.py --input_path out/attention --video_only ...

Input (``--input_path``): a folder of frames (``*.jpg``, also png/...), a video file (decoded with
``imageio`` or OpenCV when one of them is installed), or with ``--video_only`` a folder of
``attn-*.jpg`` images to assemble. Every frame, sorted by name, is normalised (optionally resized
with ``--resize``, after ToTensor), cropped to a multiple of the patch size; the last block's
[CLS] -> patch attention is **averaged over heads**, upsampled x patch size (nearest) and written as
``<output_path>/attention/attn-<frame name>.jpg`` with the inferno colour map. ``--threshold`` is
parsed as in the official script and unused there; here the mass-threshold mask of the head
average is also written as ``attention/mask-<frame>.png`` when ``--save_masks`` is given.

Video: the attention images are assembled into ``<output_path>/video.<fmt>`` at the size of the
first image, at ``--fps`` (the source fps when a video is decoded). ``mp4``/``avi`` need
``imageio`` (with its ffmpeg plugin) or OpenCV; neither is a dependency of this project, so when
none can write the file an animated GIF ``video.gif`` (Pillow) is written instead and a notice is
printed. ``--video_format gif`` always uses Pillow. The frames stay on disk in every case.
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from ibot.eval.flags import backbone_parser, device_parser
from ibot.viz.drawing import (IMAGENET_MEAN, IMAGENET_STD, cls_attention, colorize, crop_to_patch_multiple,
                            mass_threshold_mask, save_image, upsample_nearest)
from ibot.viz.loading import build_vit, list_images, load_rgb, pick_device

__all__ = ["get_args_parser", "frame_attention", "extract_frames", "write_video", "main"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


def get_args_parser():
    """Official flags (``--video_format`` also accepts ``gif``; + ``--device``, ``--save_masks``)."""
    p = argparse.ArgumentParser("Generation self-attention video", parents=[
        backbone_parser(patch_size=8, window_size=None, family="vit"), device_parser()])
    p.add_argument("--input_path", required=True, type=str,
                   help="video file, folder of frames, or (--video_only) folder of attn-*.jpg")
    p.add_argument("--output_path", default="./", type=str)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--resize", default=None, type=int, nargs="+", help="1 or 2 ints (applied after ToTensor)")
    p.add_argument("--video_only", action="store_true")
    p.add_argument("--fps", default=30.0, type=float)
    p.add_argument("--video_format", default="mp4", type=str, choices=["mp4", "avi", "gif"])
    p.add_argument("--save_masks", action="store_true", help="also write the mass-threshold mask per frame")
    return p


@torch.no_grad()
def frame_attention(model, image, threshold=None):
    """Head-averaged [CLS] attention of one frame.

    Args:
        model: ViT; image: (3, H, W) normalised frame (cropped to a multiple of the patch size here).
        threshold: when given, also the mass-threshold mask of the averaged map.
    Returns:
        (attn (H', W') float tensor, mask (H', W') bool tensor or None), H' = H - H % p, ...
    """
    p = model.patch_size
    image = crop_to_patch_multiple(image, p).unsqueeze(0)
    grid = cls_attention(model, image)[0].mean(0)                         # (h, w)
    mask = None
    if threshold is not None:
        mask = upsample_nearest(mass_threshold_mask(grid.flatten(), threshold).reshape(grid.shape), p)
    return upsample_nearest(grid, p), mask


def extract_frames(video_path, out_dir):
    """Decode a video into ``out_dir/frame-NNNN.jpg``; returns (list of paths, fps or None).

    Uses imageio (v3 API) or OpenCV, whichever is installed; raises RuntimeError otherwise.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths, fps = [], None
    try:
        import imageio.v3 as iio
        try:
            fps = iio.immeta(video_path).get("fps")
        except Exception:
            fps = None
        for k, frame in enumerate(iio.imiter(video_path)):
            paths.append(save_image(np.asarray(frame)[..., :3], os.path.join(out_dir, f"frame-{k:04d}.jpg")))
        return paths, fps
    except ImportError:
        pass
    try:
        import cv2
    except ImportError:
        raise RuntimeError(f"cannot decode {video_path}: neither imageio nor OpenCV is installed; extract "
                           f"the frames yourself (e.g. ffmpeg -i video.mp4 frames/%04d.jpg) and pass the "
                           f"folder as --input_path") from None
    cap = cv2.VideoCapture(video_path)
    fps = cap.get(cv2.CAP_PROP_FPS) or None
    k = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        paths.append(save_image(frame[..., ::-1], os.path.join(out_dir, f"frame-{k:04d}.jpg")))
        k += 1
    cap.release()
    return paths, fps


def _write_gif(frames, path, fps):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, int(round(1000.0 / fps))),
                   loop=0)
    return path


def write_video(image_paths, out_base, fps, video_format="mp4"):
    """Assemble images into a video at the size of the first image.

    Args:
        image_paths: ordered frame files; out_base: output path without extension.
        video_format: ``mp4`` / ``avi`` (imageio or OpenCV needed) or ``gif`` (Pillow).
    Returns:
        path of the written file (``<out_base>.gif`` when mp4/avi cannot be written).
    """
    if not image_paths:
        raise ValueError("no frames to assemble into a video")
    first = load_rgb(image_paths[0])
    size = first.size
    frames = []
    for p in image_paths:
        img = load_rgb(p)
        frames.append(np.asarray(img if img.size == size else img.resize(size)))
    if video_format == "gif":
        return _write_gif(frames, out_base + ".gif", fps)
    path = f"{out_base}.{video_format}"
    try:
        import imageio.v2 as imageio
        codec = "libx264" if video_format == "mp4" else "mpeg4"
        with imageio.get_writer(path, fps=fps, codec=codec, macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)
        return path
    except Exception as err:  # not installed, or no ffmpeg backend
        reason = f"imageio: {type(err).__name__}: {err}"
    try:
        import cv2
        fourcc = cv2.VideoWriter_fourcc(*("MP4V" if video_format == "mp4" else "XVID"))
        writer = cv2.VideoWriter(path, fourcc, fps, size)
        if writer.isOpened():
            for f in frames:
                writer.write(np.ascontiguousarray(f[..., ::-1]))
            writer.release()
            return path
        reason += "; OpenCV could not open the writer"
    except ImportError:
        reason += "; OpenCV not installed"
    gif = _write_gif(frames, out_base + ".gif", fps)
    print(f"Cannot write {path} ({reason}); wrote the animated GIF {gif} instead "
          f"(the frames are kept next to it).")
    return gif


def main(argv=None):
    """Run the tool. Returns ``{'frames': [attention image paths], 'video': path}``."""
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.output_path, exist_ok=True)
    fps = args.fps
    if args.video_only:
        frames = list_images(args.input_path, prefix="attn-")
        video = write_video(frames, os.path.join(args.output_path, "video"), fps, args.video_format)
        print(f"Video saved to {video}")
        return {"frames": frames, "video": video}

    if os.path.isfile(args.input_path):
        src, src_fps = extract_frames(args.input_path, os.path.join(args.output_path, "frames"))
        fps = src_fps or fps
    elif os.path.isdir(args.input_path):
        src = list_images(args.input_path)
    else:
        raise FileNotFoundError(f"--input_path not found: {args.input_path}")
    if not src:
        raise ValueError(f"no frames found in {args.input_path}")

    device = pick_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key, device)
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    attn_dir = os.path.join(args.output_path, "attention")
    os.makedirs(attn_dir, exist_ok=True)
    out = []
    for path in src:
        image = norm(load_rgb(path))
        if args.resize is not None:
            size = list(args.resize) if len(args.resize) == 2 else args.resize[0]
            image = transforms.functional.resize(image, size, antialias=True)
        attn, mask = frame_attention(model, image.to(device), args.threshold if args.save_masks else None)
        stem = os.path.splitext(os.path.basename(path))[0]
        name = os.path.join(attn_dir, f"attn-{stem}.jpg")
        save_image(colorize(attn.cpu().numpy(), cmap="inferno"), name)
        if mask is not None:
            save_image((mask.cpu().numpy()[..., None].repeat(3, 2) * 255).astype(np.uint8),
                       os.path.join(attn_dir, f"mask-{stem}.png"))
        out.append(name)
        print(f"{name} saved.")
    video = write_video(out, os.path.join(args.output_path, "video"), fps, args.video_format)
    print(f"Video saved to {video}")
    return {"frames": out, "video": video}


if __name__ == "__main__":
    main()
