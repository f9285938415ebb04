"""Data discovery and checking: every layout, and every bad input with its message (no Ray needed)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchferry.distributed import TorchferryError
from torchferry.distributed.config import TrainConfig, resolve_defaults
from torchferry.distributed.data import build_datasets, discover, load_image, materialize_digits
from torchferry.distributed.discovery import read_annotations
from torchferry.distributed.presets import build_eval_transform, build_train_transform, preprocess_spec


def cfg_for(data: str, **kw) -> TrainConfig:
    return resolve_defaults(TrainConfig(data=data, **kw))


def test_split_folder_uses_train_and_val(split_folder: Path) -> None:
    split = discover(cfg_for(str(split_folder)))
    assert split.classes == ["blue", "green", "red"]
    assert (len(split.train), len(split.val)) == (72, 24)
    assert all("/train/" in p for p, _ in split.train) and all("/val/" in p for p, _ in split.val)


def test_flat_folder_is_split_stratified_and_repeatably(flat_folder: Path) -> None:
    a = discover(cfg_for(str(flat_folder), val_split=0.25, seed=3))
    b = discover(cfg_for(str(flat_folder), val_split=0.25, seed=3))
    c = discover(cfg_for(str(flat_folder), val_split=0.25, seed=4))
    assert a.val == b.val and a.val != c.val
    assert sorted(label for _, label in a.val) == [0] * 5 + [1] * 5 + [2] * 5
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}


def test_the_split_holds_out_what_scikit_learn_holds_out() -> None:
    """Runs made before (and any other tool) hold out the images of scikit-learn's stratified train_test_split:
    the same for every seed, class balance and fraction, ties between classes included."""
    import random

    from sklearn.model_selection import train_test_split

    from torchferry.distributed.discovery import stratified_split

    draw = random.Random(0)
    for case in range(300):
        sizes = [draw.choice([2, 3, 5, 8, 13, 40, draw.randint(2, 90)]) for _ in range(draw.randint(2, 12))]
        samples = [(f"/d/{label}/{i:03d}.png", label) for label, n in enumerate(sizes) for i in range(n)]
        draw.shuffle(samples)
        fraction, seed = draw.choice([0.1, 0.2, 0.25, 0.3, 0.5, draw.uniform(0.05, 0.6)]), draw.randint(0, 10**6)
        try:
            train, val = train_test_split(samples, test_size=fraction, random_state=seed,
                                          stratify=[label for _, label in samples])
        except ValueError:  # too few images for a stratified split: ours refuses too
            with pytest.raises(TorchferryError, match="cannot split off a stratified validation set"):
                stratified_split(samples, fraction, seed)
            continue
        assert stratified_split(samples, fraction, seed) == (sorted(train), sorted(val)), (case, sizes, fraction)


def test_annotation_txt_and_csv_agree(annotation_files: dict[str, Path]) -> None:
    txt = discover(cfg_for(str(annotation_files["train.txt"]), val_data=str(annotation_files["val.txt"])))
    csv = discover(cfg_for(str(annotation_files["train.csv"]), val_data=str(annotation_files["val.csv"])))
    assert txt.classes == csv.classes == ["blue", "green", "red"]
    assert txt.train == csv.train and txt.val == csv.val
    assert all(os.path.isfile(p) for p, _ in txt.train)


def test_csv_with_a_byte_order_mark_is_read(annotation_files: dict[str, Path]) -> None:
    """A spreadsheet's UTF-8 CSV starts with a BOM; the header is still 'path,label'."""
    for part in ("train", "val"):
        path = annotation_files[f"{part}.csv"]
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    split = discover(cfg_for(str(annotation_files["train.csv"]), val_data=str(annotation_files["val.csv"])))
    assert split.classes == ["blue", "green", "red"] and len(split.train) == 72


def test_annotation_without_val_is_split(annotation_files: dict[str, Path]) -> None:
    split = discover(cfg_for(str(annotation_files["train.txt"]), val_split=0.25))
    assert (len(split.train), len(split.val)) == (54, 18)


def test_image_root_overrides_annotation_dir(annotation_files: dict[str, Path], tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.txt"
    moved.write_text(annotation_files["train.txt"].read_text())
    with pytest.raises(TorchferryError, match="unreadable"):
        discover(cfg_for(str(moved)))
    split = discover(cfg_for(str(moved), image_root=str(annotation_files["train.txt"].parent)))
    assert len(split.train) + len(split.val) == 72


def test_numeric_labels_sort_numerically(tmp_path: Path, annotation_files: dict[str, Path]) -> None:
    root = annotation_files["train.txt"].parent
    lines = [ln.rsplit(" ", 1)[0] for ln in annotation_files["train.txt"].read_text().splitlines()[1:]]
    labels = ["2", "10", "9"]
    ann = root / "numeric.txt"
    ann.write_text("".join(f"{p} {labels[i % 3]}\n" for i, p in enumerate(lines)))
    assert discover(cfg_for(str(ann))).classes == ["2", "9", "10"]


def test_digits_are_written_once_as_real_pngs(tmp_path: Path) -> None:
    root = materialize_digits(str(tmp_path / "c"))
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png")]
    assert len(files) == 1797 and sorted(os.listdir(root))[1:] == [str(i) for i in range(10)]
    mtime = os.path.getmtime(files[0])
    assert materialize_digits(str(tmp_path / "c")) == root and os.path.getmtime(files[0]) == mtime
    with Image.open(files[0]) as img:
        assert img.size == (8, 8) and img.mode == "L"
    split = discover(cfg_for("digits", cache_dir=str(tmp_path / "c")))
    assert len(split.classes) == 10 and len(split.train) + len(split.val) == 1797


def test_cifar10_format_root_reads_through_torchvision(cifar10_root: Path) -> None:
    cfg = cfg_for(f"cifar10:{cifar10_root}")
    split = discover(cfg)
    assert split.torchvision_name == "cifar10" and split.classes[:3] == ["airplane", "automobile", "bird"]
    train, val = build_datasets(split, 3, build_train_transform(cfg), build_eval_transform(preprocess_spec(cfg)))
    assert (len(train), len(val)) == (60, 24)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


class _Runs:
    """Unpickling this calls exec: what a crafted CIFAR-10 file in a data folder would do."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("member", ["data_batch_3", "test_batch", "batches.meta"])
def test_a_cifar10_file_is_read_as_data_never_run(cifar10_root: Path, tmp_path: Path, member: str) -> None:
    marker = tmp_path / "ran"
    with open(cifar10_root / "cifar-10-batches-py" / member, "wb") as f:
        pickle.dump({"data": _Runs(f"open({str(marker)!r}, 'w').close()"), "labels": [0],
                     "label_names": _Runs(f"open({str(marker)!r}, 'w').close()")}, f)
    with pytest.raises(TorchferryError, match=r"builtins\.exec is not data") as err:
        split = discover(cfg_for(f"cifar10:{cifar10_root}"))
        build_datasets(split, 3, build_train_transform(cfg_for("digits")), None)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "flowers102"])
def test_torchvision_root_missing_says_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(TorchferryError, match="--download"):
        discover(cfg_for(f"{name}:{tmp_path / 'nothing'}"))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(str(tmp_path / "r.jpg"), 3).size == (10, 30)
    assert load_image(str(tmp_path / "r.jpg"), 1).mode == "L"


# ------------------------------------------------------------------------------------------------
# bad input: each gets its own clear message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TorchferryError, match="does not exist"):
        discover(cfg_for(str(tmp_path / "nope")))


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    from helpers import write_class_tree

    write_class_tree(tmp_path / "one", 5, classes=("red",))
    with pytest.raises(TorchferryError, match="at least 2"):
        discover(cfg_for(str(tmp_path / "one")))


def test_val_class_missing_from_train(split_folder: Path) -> None:
    from helpers import write_class_tree

    write_class_tree(split_folder / "val", 2, classes=("red",))
    (split_folder / "val" / "purple").mkdir()
    (split_folder / "val" / "red" / "000.png").rename(split_folder / "val" / "purple" / "000.png")
    with pytest.raises(TorchferryError, match=r"validation classes \['purple'\]"):
        discover(cfg_for(str(split_folder)))


def test_annotation_line_that_does_not_parse_names_its_line(annotation_files: dict[str, Path]) -> None:
    path = annotation_files["train.txt"]
    lines = path.read_text().splitlines()
    lines.insert(3, "just-one-field")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TorchferryError, match=r"train.txt:4: expected 'relative/path label'"):
        read_annotations(str(path), str(path.parent))


def test_csv_without_label_column(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(TorchferryError, match="'path' and 'label' columns"):
        read_annotations(str(tmp_path / "a.csv"), str(tmp_path))


def test_unreadable_images_are_counted_and_skippable(flat_folder: Path) -> None:
    (flat_folder / "red" / "bad1.png").write_bytes(b"not an image")
    good = (flat_folder / "green" / "000.png").read_bytes()
    (flat_folder / "green" / "bad2.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(TorchferryError, match=r"2 unreadable image\(s\).*--skip-bad-images"):
        discover(cfg_for(str(flat_folder)))
    split = discover(cfg_for(str(flat_folder), skip_bad_images=True))
    assert len(split.bad_images) == 2 and len(split.train) + len(split.val) == 60


def _within(seconds: float, fn):
    """fn()'s result, or an AssertionError when it does not return in time (its daemon thread is left blocked)."""
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=_outcome(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "value" in out, f"still blocked after {seconds} s"
    if isinstance(out["value"], BaseException):
        raise out["value"]
    return out["value"]


def _outcome(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
        return exc


def test_a_fifo_named_like_an_image_never_blocks_training(flat_folder: Path, annotation_files: dict) -> None:
    """A data folder's FIFO named x.png blocked the image check for ever (and a DataLoader worker): a folder scan
    leaves it out, an annotation file that lists it names it as unreadable, and reading it fails at once."""
    os.mkfifo(flat_folder / "red" / "zz.png")
    split = _within(30, lambda: discover(cfg_for(str(flat_folder))))
    assert len(split.train) + len(split.val) == 60
    ann = annotation_files["train.txt"]
    os.mkfifo(ann.parent / "images" / "pipe.png")
    ann.write_text(ann.read_text() + "images/pipe.png red\n")
    with pytest.raises(TorchferryError, match=r"1 unreadable image\(s\): .*pipe.png .*not a regular file"):
        _within(30, lambda: discover(cfg_for(str(ann), val_data=str(annotation_files["val.txt"]))))
    with pytest.raises(TorchferryError, match="not a regular file"):
        _within(30, lambda: load_image(str(flat_folder / "red" / "zz.png"), 3))


def test_val_folder_without_train_folder_is_refused_not_learned(flat_folder: Path) -> None:
    from helpers import write_class_tree

    write_class_tree(flat_folder / "val", 3)
    with pytest.raises(TorchferryError, match="has a val/ folder but no train/ folder"):
        discover(cfg_for(str(flat_folder)))


def test_train_folder_without_val_is_split(tmp_path: Path) -> None:
    from helpers import write_class_tree

    write_class_tree(tmp_path / "ds" / "train", 10)
    split = discover(cfg_for(str(tmp_path / "ds"), val_split=0.2))
    assert split.classes == ["blue", "green", "red"] and len(split.train) + len(split.val) == 30


def test_checkpoint_named_torchvision_root_needs_explicit_data(cifar10_root: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A checkpoint is untrusted: it cannot make the tools unpickle files from a root it names."""
    from helpers import write_checkpoint

    from torchferry.distributed import evaluate

    path = write_checkpoint(tmp_path / "c.pth", "smallcnn", f"cifar10:{cifar10_root}", size=32)
    assert evaluate.main([str(path), "--output-dir", str(tmp_path)]) == 2
    assert "pass --data to read it" in capsys.readouterr().err
    assert evaluate.main([str(path), "--data", f"cifar10:{cifar10_root}", "--output-dir", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------------------------
# symlinks: each real file once, loops never followed, one file never in two places


@pytest.fixture
def no_hang():
    """Fail instead of hanging: discovery that follows a symlink loop never finishes."""
    import signal

    def expired(*_):
        # not TimeoutError: that is an OSError, which os.walk swallows and walks on
        pytest.fail("discovery did not finish in 60 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_symlink_loops_are_walked_once(tmp_path: Path, no_hang: None) -> None:
    """Two links to the root and a link to itself in a class folder: 12 files stay 12 samples, none in both parts."""
    from helpers import write_class_tree

    root = tmp_path / "loops"
    write_class_tree(root, 4)
    (root / "red" / "up").symlink_to(root, target_is_directory=True)
    (root / "red" / "up2").symlink_to(root, target_is_directory=True)
    (root / "green" / "me").symlink_to(root / "green", target_is_directory=True)
    (root / "blue" / "sub").mkdir()
    (root / "blue" / "sub" / "back").symlink_to(root / "blue", target_is_directory=True)
    split = discover(cfg_for(str(root), val_split=0.25))
    samples = split.train + split.val
    assert len(samples) == 12 and len({os.path.realpath(p) for p, _ in samples}) == 12
    assert not {os.path.realpath(p) for p, _ in split.train} & {os.path.realpath(p) for p, _ in split.val}


def test_a_linked_folder_of_new_images_still_counts(tmp_path: Path) -> None:
    from helpers import write_class_tree

    write_class_tree(tmp_path / "data", 4)
    write_class_tree(tmp_path / "more", 3, seed=9, classes=("red",))
    (tmp_path / "data" / "red" / "more").symlink_to(tmp_path / "more" / "red", target_is_directory=True)
    split = discover(cfg_for(str(tmp_path / "data"), val_split=0.25))
    assert len(split.train) + len(split.val) == 15


def test_a_file_in_both_train_and_val_is_refused(split_folder: Path) -> None:
    os.symlink(split_folder / "train" / "red" / "000.png", split_folder / "val" / "red" / "leak.png")
    with pytest.raises(TorchferryError, match=r"1 file\(s\) are in both the training and the validation data"):
        discover(cfg_for(str(split_folder)))


def test_a_file_listed_in_both_annotation_files_is_refused(annotation_files: dict[str, Path]) -> None:
    val = annotation_files["val.txt"]
    val.write_text(val.read_text() + annotation_files["train.txt"].read_text().splitlines()[1] + "\n")
    with pytest.raises(TorchferryError, match="in both the training and the validation data"):
        discover(cfg_for(str(annotation_files["train.txt"]), val_data=str(val)))


def test_an_annotation_file_listing_an_image_twice_counts_it_once(annotation_files: dict[str, Path]) -> None:
    train = annotation_files["train.txt"]
    train.write_text(train.read_text() + "".join(train.read_text().splitlines(keepends=True)[1:4]))
    split = discover(cfg_for(str(train), val_split=0.25))
    assert len(split.train) + len(split.val) == 72


def test_one_file_under_two_classes_is_refused(flat_folder: Path) -> None:
    os.symlink(flat_folder / "red" / "000.png", flat_folder / "green" / "also-red.png")
    with pytest.raises(TorchferryError, match="are the same file in classes 'green' and 'red'"):
        discover(cfg_for(str(flat_folder)))


def test_cache_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TorchferryError, match="--cache-dir .* is not a directory"):
        discover(cfg_for("digits", cache_dir=str(tmp_path / "file")))


# ------------------------------------------------------------------------------------------------
# a checkpoint's recorded data: read only when --data names them again; the digits cache is the operator's


def _recorded(data: str, **config) -> dict:
    return {"config": TrainConfig(data=data, **config).to_dict()}


@pytest.mark.parametrize("kind", ["folder", "annotations", "cifar10"])
def test_recorded_data_are_read_only_when_named_again(kind: str, flat_folder: Path,
                                                      annotation_files: dict[str, Path]) -> None:
    from torchferry.distributed.data import checkpoint_data_config

    data = {"folder": str(flat_folder), "annotations": str(annotation_files["train.txt"]),
            "cifar10": "cifar10:/somewhere"}[kind]
    with pytest.raises(TorchferryError, match="pass --data to read it"):
        checkpoint_data_config(_recorded(data), None)
    assert checkpoint_data_config(_recorded(data), data).data == data


def test_recorded_val_data_image_root_and_cache_are_dropped(tmp_path: Path, flat_folder: Path) -> None:
    from torchferry.distributed.config import default_cache_dir
    from torchferry.distributed.data import checkpoint_data_config

    recorded = _recorded(str(flat_folder), val_data="/etc", image_root="/", cache_dir=str(tmp_path / "theirs"),
                         seed=7, val_split=0.3)
    cfg = checkpoint_data_config(recorded, str(flat_folder))
    assert (cfg.val_data, cfg.image_root, cfg.cache_dir) == (None, None, default_cache_dir())
    assert (cfg.seed, cfg.val_split) == (7, 0.3)


def test_the_command_names_the_validation_file_again(annotation_files: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate --data train.csv --val-data val.csv reads the validation file the run was trained with."""
    from torchferry.distributed.data import checkpoint_data_config

    train, val = annotation_files["train.csv"], annotation_files["val.csv"]
    recorded = _recorded(str(train), val_data=str(val))
    monkeypatch.chdir(val.parent)
    cfg = checkpoint_data_config(recorded, str(train), val_data=val.name)
    assert cfg.val_data == str(val)  # made absolute where the command runs
    split = discover(cfg)
    assert {os.path.dirname(p).split(os.sep)[-2] for p, _ in split.val} == {"val"} and len(split.val) == 24
    with pytest.raises(TorchferryError, match="go with --data"):
        checkpoint_data_config(_recorded("digits"), None, val_data=str(val))


def test_a_checkpoints_cache_dir_is_never_written(tmp_path: Path) -> None:
    """A digits checkpoint that recorded cache_dir elsewhere: export's real-image check uses the operator's cache."""
    from torchferry.export.verify import real_batches

    elsewhere = tmp_path / "chosen-by-the-file"
    checkpoint = {"classes": [str(i) for i in range(10)], **_recorded("digits", cache_dir=str(elsewhere)),
                  "preprocess": {"size": [8, 8], "resize": 8, "mean": [0.5], "std": [0.5], "channels": 1}}
    batches, note = real_batches(checkpoint, None, 8)
    assert next(batches)[0].shape == (8, 1, 8, 8) and "digits" in note
    assert not elsewhere.exists()


def test_the_image_check_notes_what_the_images_are(digits_folder: Path, flat_folder: Path) -> None:
    assert discover(cfg_for(str(digits_folder))).profile == {"images": 300, "median_side": 8, "grayscale": True}
    color = discover(cfg_for(str(flat_folder), check_images="none")).profile  # a sample of headers is read
    assert color == {"images": 48, "median_side": 20, "grayscale": False}


CHECK_PEAK = """
import sys
from torchferry.distributed import image_check

def high_water_mib():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) // 1024

image_check.DECODE_PIXELS_AT_ONCE = int(sys.argv[1])
before = high_water_mib()
looked = image_check._inspect_images(sys.argv[2:], True)
print(high_water_mib() - before)
print(repr(looked))
"""


def test_the_full_image_check_decodes_within_a_pixel_budget(tmp_path: Path) -> None:
    """Eight 9 MP images (36 MB of pixels each) and a truncated one, with a budget of one image's pixels: the
    driver's peak RSS grows by about one image (39 MiB; 206-251 MiB before, up to 8 at once), and every size,
    mode and error is as before."""
    import ast
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((3000, 3000)).save(path)
        paths.append(str(path))
    Image.new("L", (300, 200)).save(tmp_path / "gray.png")
    (tmp_path / "cut.jpg").write_bytes(Path(paths[0]).read_bytes()[:20_000])
    paths += [str(tmp_path / "gray.png"), str(tmp_path / "cut.jpg")]
    proc = subprocess.run([sys.executable, "-c", CHECK_PEAK, str(3000 * 3000), *paths], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    grown, looked = int(proc.stdout.splitlines()[0]), ast.literal_eval(proc.stdout.splitlines()[1])
    assert grown < 36 * 1.6, f"{grown} MiB over the imports for 36 MB of pixels at once"
    assert looked[:9] == [(None, (3000, 3000), "RGB")] * 8 + [(None, (300, 200), "L")]
    assert looked[9][0].startswith("OSError: image file is truncated") and looked[9][1:] == ((0, 0), "")


def test_a_class_of_one_image_needs_allow_small_classes(tmp_path: Path, annotation_files: dict[str, Path]) -> None:
    from helpers import write_class_tree

    write_class_tree(tmp_path / "flat", 10)
    (tmp_path / "flat" / "violet").mkdir()
    (tmp_path / "flat" / "red" / "000.png").rename(tmp_path / "flat" / "violet" / "000.png")
    with pytest.raises(TorchferryError, match=r"classes \['violet'\] have a single image.*--allow-small-classes"):
        discover(cfg_for(str(tmp_path / "flat")))
    split = discover(cfg_for(str(tmp_path / "flat"), allow_small_classes=True))
    violet = split.classes.index("violet")
    assert [label for _, label in split.train].count(violet) == 1  # nothing to hold out: it trains
    train = annotation_files["train.csv"]
    Image.new("RGB", (20, 20), (200, 40, 40)).save(train.parent / "images" / "extra.png")
    train.write_text(train.read_text() + "images/extra.png,rde\n")
    with pytest.raises(TorchferryError, match=rf"'rde' \(1 image, {train}:74\)"):
        discover(cfg_for(str(train)))
    assert "rde" in discover(cfg_for(str(train), allow_small_classes=True)).classes


def test_checkpoint_datasets_rebuild_the_split_through_the_eval_transform(flat_folder: Path) -> None:
    """evaluate, verify and quantize read a checkpoint's data through one function: same split, same classes."""
    from torchferry.distributed.data import checkpoint_datasets

    cfg = cfg_for(str(flat_folder), image_size=16, resize_size=16)
    split = discover(cfg)
    checkpoint = {"config": cfg.to_dict(), "classes": list(split.classes), "preprocess": preprocess_spec(cfg)}
    rebuilt = checkpoint_datasets(checkpoint, str(flat_folder))
    assert rebuilt.source == str(flat_folder) and len(rebuilt.val) == len(split.val)
    assert len(rebuilt.train) == len(split.train)
    image, label = rebuilt.train[0]
    assert tuple(image.shape) == (cfg.channels, 16, 16) and image.dtype == torch.float32  # eval transform, both
    with pytest.raises(TorchferryError, match="differ from the checkpoint's"):
        checkpoint_datasets({**checkpoint, "classes": ["x", "y"]}, str(flat_folder))
