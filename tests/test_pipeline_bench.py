"""benchmarks/loader.py (issue 17): its photo folder and its JSON line."""
import json
from pathlib import Path

from PIL import Image
from repo_files import load_repo_file

# benchmarks/loader.py under its own name (the top-level loader.py door is another module)
loader_bench = load_repo_file("benchmarks/loader.py")

RECIPE = ["--local_crops_number", "3", "--global_crops_scale", "0.25", "1", "--local_crops_scale", "0.05", "0.25",
          "--global_crops_size", "64", "--local_crops_size", "32"]


def test_photo_folder_is_imagenet_sized_jpeg(tmp_path):
    root = loader_bench.build_photo_folder(str(tmp_path / "photos"), n=6)
    files = sorted(Path(root).glob("photo_*.jpg"))
    assert len(files) == 6
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert max(im.size) in (450, 500) and 333 <= min(im.size) <= 400
    again = loader_bench.build_photo_folder(str(tmp_path / "photos2"), n=6)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(Path(again).glob("photo_*.jpg"))]


def test_loader_benchmark_json_line(tmp_path, capsys):
    root = loader_bench.build_photo_folder(str(tmp_path / "photos"), n=3)
    loader_bench.main(RECIPE + ["--image_folder", root, "--rounds", "2", "--images", "2",
                                "--paths", "official,pil,fast,device"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images_per_round"] == 2 and result["local_crops"] == "3x32"
    assert set(result["paths"]) == {"official", "pil", "fast", "device"}
    for name, r in result["paths"].items():
        stages = r["stages_ms"]
        assert {"decode", "masks", "other"} <= set(stages), name
        # the stages (and the rest, "other") add up to the CPU time per image
        assert abs(sum(stages.values()) - r["cpu_ms_per_image"]) < 0.05 * r["cpu_ms_per_image"] + 0.01
        assert abs(r["images_per_s_per_core"] * r["cpu_ms_per_image"] / 1e3 - 1) < 0.02
    assert {"color_jitter", "blur", "crop_resize", "normalize"} <= set(result["paths"]["official"]["stages_ms"])
    assert {"colour", "draw", "crop_resize"} <= set(result["paths"]["fast"]["stages_ms"])
    assert "colour" not in result["paths"]["device"]["stages_ms"]   # the device does the colour work
    assert result["speedup"]["official"] == 1.0
