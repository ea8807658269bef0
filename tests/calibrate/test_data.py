import inspect
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qdq import calibrate_model
from qdq.calibrate.data import (
    DataListSource,
    DataSourceError,
    ImageFolderSource,
    NumpyFolderSource,
    check_inputs,
    match_model_inputs,
)
from qdq.transform.replace import replace_to_quantization_module


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def _image(path, value, size=(6, 5), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, color).save(path)


def _image_tree(root):
    """cat/0..2.png, dog/0..1.png with distinct pixel values; returns values in sorted-path order."""
    values = {"cat/0.png": 10, "cat/1.png": 20, "cat/2.png": 30, "dog/0.png": 40, "dog/1.png": 50}
    for rel, value in values.items():
        _image(root / rel, value)
    return [values[k] for k in sorted(values)]


def _conv_model(channels=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, channels, 5, 6))
    replace_to_quantization_module(model)
    return model


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, image, mask):
        return self.a(image) + self.b(mask)


# --------------------------------------------------------------------------------------------------------------------
# ImageFolderSource
# --------------------------------------------------------------------------------------------------------------------


def test_image_folder_class_tree_sorted_batches(tmp_path):
    values = _image_tree(tmp_path)
    source = ImageFolderSource(tmp_path, to_tensor, batch_size=2)
    assert len(source) == 3 and source.num_samples == 5
    batches = list(source)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 5, 6), (2, 3, 5, 6), (1, 3, 5, 6)]
    assert torch.cat(batches)[:, 0, 0, 0].tolist() == values
    assert [p.relative_to(tmp_path).as_posix() for p in source.files] == [
        "cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"
    ]


def test_image_folder_is_reiterable_and_lazy(tmp_path):
    _image_tree(tmp_path)
    calls = []

    def counting(image):
        calls.append(1)
        return to_tensor(image)

    source = ImageFolderSource(tmp_path, counting, batch_size=2)
    assert not calls  # nothing read when the source is made
    it = iter(source)
    next(it)
    assert len(calls) == 2  # one batch read, not the whole folder
    first = torch.cat(list(source))
    second = torch.cat(list(source))
    assert torch.equal(first, second)


def test_image_folder_flat_extensions_hidden_and_mode(tmp_path, caplog):
    _image(tmp_path / "b.PNG", 200, mode="L")  # upper-case extension, grayscale
    _image(tmp_path / "a.jpg", 100)
    _image(tmp_path / "._a.jpg", 1)  # macOS resource fork: hidden, skipped
    (tmp_path / "labels.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="qdq.calibrate.data"):
        source = ImageFolderSource(tmp_path, to_tensor, batch_size=8)
    assert [p.name for p in source.files] == ["a.jpg", "b.PNG"]
    assert "skipped 1 hidden" in caplog.text and "ignored 1 files" in caplog.text
    batch = next(iter(source))
    assert batch.shape == (2, 3, 5, 6)  # the grayscale image was converted to RGB
    assert batch[1, :, 0, 0].tolist() == [200.0, 200.0, 200.0]
    only_png = ImageFolderSource(tmp_path, to_tensor, extensions=["png"])
    assert [p.name for p in only_png.files] == ["b.PNG"]


def test_image_folder_limit_and_seed(tmp_path):
    for i in range(12):
        _image(tmp_path / f"c{i // 4}" / f"{i:02d}.png", i)
    assert [p.name for p in ImageFolderSource(tmp_path, to_tensor, limit=3).files] == ["00.png", "01.png", "02.png"]
    assert {p.parent.name for p in ImageFolderSource(tmp_path, to_tensor, limit=4).files} == {"c0"}
    a = ImageFolderSource(tmp_path, to_tensor, limit=4, seed=1).files
    b = ImageFolderSource(tmp_path, to_tensor, limit=4, seed=1).files
    assert a == b and len(a) == 4  # deterministic
    assert len({p.parent.name for p in a}) > 1  # a random subset reaches past the first class
    assert ImageFolderSource(tmp_path, to_tensor, seed=2).files != ImageFolderSource(tmp_path, to_tensor).files


def test_image_folder_unreadable_image_named(tmp_path):
    _image(tmp_path / "good.png", 3)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    source = ImageFolderSource(tmp_path, to_tensor, batch_size=1)
    with pytest.raises(DataSourceError, match=r"cannot read image .*broken\.jpg"):
        list(source)


def test_image_folder_preprocess_errors_named(tmp_path):
    _image(tmp_path / "a.png", 1, size=(6, 5))
    _image(tmp_path / "b.png", 2, size=(7, 5))
    with pytest.raises(TypeError, match=r"preprocess gave a Image for .*a\.png.*ToTensor"):
        list(ImageFolderSource(tmp_path, lambda image: image))
    with pytest.raises(DataSourceError, match=r"cannot batch .*b\.png \(float32\[3, 5, 7\]\) with .*a\.png"):
        list(ImageFolderSource(tmp_path, to_tensor, batch_size=2))
    assert len(list(ImageFolderSource(tmp_path, to_tensor, batch_size=1))) == 2  # fine one at a time

    def failing(image):
        raise RuntimeError("bad crop")

    with pytest.raises(DataSourceError, match=r"preprocess failed on .*a\.png: bad crop"):
        list(ImageFolderSource(tmp_path, failing))


def test_image_folder_bad_roots_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", to_tensor)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        ImageFolderSource(tmp_path / "file.txt", to_tensor)
    with pytest.raises(DataSourceError, match="no image files"):
        ImageFolderSource(tmp_path, to_tensor)
    _image(tmp_path / "a.png", 1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ImageFolderSource(tmp_path, to_tensor, batch_size=0)
    with pytest.raises(TypeError, match="preprocess must be callable"):
        ImageFolderSource(tmp_path, None)


# --------------------------------------------------------------------------------------------------------------------
# NumpyFolderSource
# --------------------------------------------------------------------------------------------------------------------


def test_numpy_folder_npy_batches_and_reiteration(tmp_path):
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.full((3, 2), i, dtype=np.float32))
    source = NumpyFolderSource(tmp_path, batch_size=2)
    assert len(source) == 3 and source.input_names is None
    first = [b.clone() for b in source]
    assert [tuple(b.shape) for b in first] == [(2, 3, 2), (2, 3, 2), (1, 3, 2)]
    assert torch.cat(first)[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(first, source))
    named = NumpyFolderSource(tmp_path, names=["x"])
    assert list(named.sample(0)) == ["x"] and named.input_names == ["x"]


def test_numpy_folder_has_batch_dim_and_dtype(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.full((1, 3, 2), i, dtype=np.float64))
    stacked = next(iter(NumpyFolderSource(tmp_path, batch_size=2)))
    assert stacked.shape == (2, 1, 3, 2) and stacked.dtype == torch.float64
    cat = next(iter(NumpyFolderSource(tmp_path, batch_size=2, has_batch_dim=True, dtype=torch.float32)))
    assert cat.shape == (2, 3, 2) and cat.dtype == torch.float32
    assert cat[:, 0, 0].tolist() == [0.0, 1.0]


def test_numpy_folder_npz_dicts_and_names(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", mask=np.full(5, i, dtype=np.float32), image=np.zeros((2, 4), np.float32))
    batches = list(NumpyFolderSource(tmp_path, batch_size=2))
    assert [list(b) for b in batches] == [["mask", "image"], ["mask", "image"]]  # the file's key order
    assert batches[0]["mask"].shape == (2, 5) and batches[1]["image"].shape == (1, 2, 4)
    assert batches[0]["mask"][:, 0].tolist() == [0.0, 1.0]
    ordered = NumpyFolderSource(tmp_path, names=["image", "mask"])
    assert list(next(iter(ordered))) == ["image", "mask"] and ordered.input_names == ["image", "mask"]
    with pytest.raises(DataSourceError, match=r"0\.npz lacks 'label'"):
        NumpyFolderSource(tmp_path, names=["label"])


def test_numpy_folder_mixed_kinds_named(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(2))
    np.savez(tmp_path / "b.npz", x=np.zeros(2))
    with pytest.raises(DataSourceError, match=r"mixes \.npy files \(.*a\.npy\) and \.npz files \(.*b\.npz\)"):
        NumpyFolderSource(tmp_path)


def test_numpy_folder_npz_key_mismatch_named(tmp_path):
    np.savez(tmp_path / "0.npz", x=np.zeros(2), y=np.zeros(2))
    np.savez(tmp_path / "1.npz", x=np.zeros(2), z=np.zeros(2))
    with pytest.raises(DataSourceError, match=r"1\.npz lacks 'y' and has 'z' in addition.*as .*0\.npz"):
        NumpyFolderSource(tmp_path)


def test_numpy_folder_shape_mismatch_only_when_batching(tmp_path):
    np.savez(tmp_path / "0.npz", x=np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "1.npz", x=np.zeros((2, 4), np.float32))
    message = r"1\.npz \['x'\] is float32\[2, 4\] but .*0\.npz \['x'\] is float32\[2, 3\]"
    with pytest.raises(DataSourceError, match=message):
        NumpyFolderSource(tmp_path, batch_size=2)
    shapes = [tuple(b["x"].shape) for b in NumpyFolderSource(tmp_path, batch_size=1)]
    assert shapes == [(1, 2, 3), (1, 2, 4)]


def test_numpy_folder_dtype_mismatch_and_cast(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros(3, np.float32))
    np.save(tmp_path / "1.npy", np.zeros(3, np.float64))
    with pytest.raises(DataSourceError, match=r"1\.npy is float64\[3\]"):
        NumpyFolderSource(tmp_path, batch_size=2)
    assert next(iter(NumpyFolderSource(tmp_path, batch_size=2, dtype=torch.float32))).dtype == torch.float32


def test_numpy_folder_bad_files_named(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros(3))
    (tmp_path / "1.npy").write_bytes(b"garbage, not numpy")
    with pytest.raises(DataSourceError, match=r"1\.npy is not a readable NumPy \.npy file"):
        NumpyFolderSource(tmp_path)
    (tmp_path / "1.npy").unlink()
    np.save(tmp_path / "2.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataSourceError, match=r"2\.npy holds Python objects"):
        NumpyFolderSource(tmp_path)


def test_numpy_folder_reads_lazily(tmp_path):
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", np.full(2, i, dtype=np.float32))
    source = NumpyFolderSource(tmp_path, batch_size=2)
    (tmp_path / "3.npy").unlink()  # after the header scan: only the second batch needs it
    it = iter(source)
    assert next(it)[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(FileNotFoundError, match=r"3\.npy does not exist \(it did when the source was made\)"):
        next(it)


def test_numpy_folder_empty_and_bad_names(tmp_path):
    with pytest.raises(DataSourceError, match="no .npy or .npz files"):
        NumpyFolderSource(tmp_path)
    np.save(tmp_path / "0.npy", np.zeros(2))
    with pytest.raises(ValueError, match="names takes one name"):
        NumpyFolderSource(tmp_path, names=["a", "b"])
    with pytest.raises(TypeError, match="list of non-empty strings"):
        NumpyFolderSource(tmp_path, names="x")


# --------------------------------------------------------------------------------------------------------------------
# DataListSource
# --------------------------------------------------------------------------------------------------------------------


def _pairs(root, n=3):
    (root / "arrays").mkdir(exist_ok=True)
    for i in range(n):
        np.save(root / "arrays" / f"a{i}.npy", np.full(4, i, dtype=np.float32))
        np.save(root / "arrays" / f"b{i}.npy", np.full(5, 10 + i, dtype=np.float32))


def test_data_list_comments_blank_lines_relative_and_absolute_paths(tmp_path):
    _pairs(tmp_path)
    absolute = tmp_path / "arrays" / "a2.npy"
    (tmp_path / "list.txt").write_text(f"# header comment\n\narrays/a0.npy\n   \n  # indented comment\n{absolute}\n")
    source = DataListSource(tmp_path / "list.txt", batch_size=4)
    assert [n for n, _ in source.entries] == [3, 6]
    assert len(source) == 1
    assert next(iter(source))[:, 0].tolist() == [0.0, 2.0]


def test_data_list_relative_to_list_file_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    _pairs(tmp_path / "lists")
    (tmp_path / "lists" / "l.txt").write_text("arrays/a1.npy\n")
    monkeypatch.chdir(tmp_path)
    assert next(iter(DataListSource("lists/l.txt")))[0, 0].item() == 1.0


def test_data_list_multi_input_tuple_and_names(tmp_path):
    _pairs(tmp_path)
    (tmp_path / "list.txt").write_text(
        "arrays/a0.npy, arrays/b0.npy\narrays/a1.npy,arrays/b1.npy\narrays/a2.npy,arrays/b2.npy\n"
    )
    source = DataListSource(tmp_path / "list.txt", batch_size=2)
    batches = list(source)
    assert len(source) == 2 and len(batches) == 2
    (x, y), = batches[0]
    assert x.shape == (2, 4) and y.shape == (2, 5) and y[:, 0].tolist() == [10.0, 11.0]
    again = list(source)
    assert torch.equal(again[1][0][0], batches[1][0][0])
    named = DataListSource(tmp_path / "list.txt", input_names=["image", "mask"])
    assert {k: tuple(v.shape) for k, v in next(iter(named)).items()} == {"image": (1, 4), "mask": (1, 5)}
    with pytest.raises(ValueError, match=r"1 input_names \(image\) for lines of 2 inputs"):
        DataListSource(tmp_path / "list.txt", input_names=["image"])


def test_data_list_missing_file_names_line_and_path(tmp_path):
    _pairs(tmp_path)
    (tmp_path / "list.txt").write_text("arrays/a0.npy\n# comment\narrays/missing.npy\n")
    message = r"list\.txt, line 3: 'arrays/missing\.npy' \(.*missing\.npy\) does not exist"
    with pytest.raises(FileNotFoundError, match=message):
        DataListSource(tmp_path / "list.txt")
    with pytest.raises(FileNotFoundError, match=r"the list file .*nope\.txt does not exist"):
        DataListSource(tmp_path / "nope.txt")


def test_data_list_inconsistent_lines_named(tmp_path):
    _pairs(tmp_path)
    _image(tmp_path / "img.png", 5)
    (tmp_path / "count.txt").write_text("arrays/a0.npy,arrays/b0.npy\n\narrays/a1.npy\n")
    with pytest.raises(DataSourceError, match=r"count\.txt, line 3: 1 inputs, but line 1 has 2"):
        DataListSource(tmp_path / "count.txt")
    (tmp_path / "kinds.txt").write_text("arrays/a0.npy\nimg.png\n")
    with pytest.raises(DataSourceError, match=r"kinds\.txt, line 2: inputs of kinds \(image\), but line 1 has \(npy\)"):
        DataListSource(tmp_path / "kinds.txt", preprocess=to_tensor)
    (tmp_path / "empty_item.txt").write_text("arrays/a0.npy,\n")
    with pytest.raises(DataSourceError, match=r"line 1: an empty path"):
        DataListSource(tmp_path / "empty_item.txt")
    (tmp_path / "shapes.txt").write_text("arrays/a0.npy\narrays/b0.npy\n")
    with pytest.raises(DataSourceError, match=r"shapes\.txt, line 2 \(.*b0\.npy\) is float32\[5\]"):
        DataListSource(tmp_path / "shapes.txt", batch_size=2)


def test_data_list_npz_lines(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", image=np.full(4, i, np.float32), mask=np.ones(5, np.float32))
    (tmp_path / "list.txt").write_text("s0.npz\ns1.npz\ns2.npz\n")
    batches = list(DataListSource(tmp_path / "list.txt", batch_size=2))
    assert [list(b) for b in batches] == [["image", "mask"]] * 2 and batches[0]["image"][:, 0].tolist() == [0, 1]
    only = DataListSource(tmp_path / "list.txt", input_names=["mask"])
    assert list(next(iter(only))) == ["mask"] and only.input_names == ["mask"]
    np.save(tmp_path / "extra.npy", np.zeros(2))
    (tmp_path / "bad.txt").write_text("s0.npz,extra.npy\n")
    with pytest.raises(DataSourceError, match=r"bad\.txt, line 1: an \.npz file .* must be alone on its line"):
        DataListSource(tmp_path / "bad.txt")
    np.savez(tmp_path / "other.npz", image=np.zeros(4, np.float32))
    (tmp_path / "keys.txt").write_text("s0.npz\nother.npz\n")
    with pytest.raises(DataSourceError, match=r"keys\.txt, line 2 \(.*other\.npz\) lacks 'mask'"):
        DataListSource(tmp_path / "keys.txt")


def test_data_list_images_preprocess_loader_and_unknown(tmp_path):
    _image(tmp_path / "im" / "a.jpg", 10)
    _image(tmp_path / "im" / "b.png", 20)
    (tmp_path / "list.txt").write_text("im/a.jpg\nim/b.png\n")
    with pytest.raises(ValueError, match=r"line 1: a\.jpg is an image; pass preprocess="):
        DataListSource(tmp_path / "list.txt")
    batch = next(iter(DataListSource(tmp_path / "list.txt", batch_size=2, preprocess=to_tensor)))
    assert batch.shape == (2, 3, 5, 6) and batch[:, 0, 0, 0].tolist() == [10.0, 20.0]

    (tmp_path / "v0.txt").write_text("1 2 3")
    (tmp_path / "v1.txt").write_text("4 5 6")
    (tmp_path / "text.txt").write_text("v0.txt\nv1.txt\n")
    with pytest.raises(DataSourceError, match=r"line 1: no reader for 'v0\.txt'.*pass loader="):
        DataListSource(tmp_path / "text.txt")
    source = DataListSource(tmp_path / "text.txt", lambda p: np.loadtxt(p, dtype=np.float32), batch_size=2)
    assert next(iter(source)).tolist() == [[1, 2, 3], [4, 5, 6]]

    def broken(path):
        raise OSError("disk on fire")

    with pytest.raises(DataSourceError, match=r"loader failed on .*text\.txt, line 1: .*v0\.txt: disk on fire"):
        list(DataListSource(tmp_path / "text.txt", broken))


def test_data_list_empty_and_limit(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataSourceError, match=r"empty\.txt lists no samples"):
        DataListSource(tmp_path / "empty.txt")
    _pairs(tmp_path)
    (tmp_path / "list.txt").write_text("arrays/a0.npy\narrays/a1.npy\narrays/a2.npy\n")
    assert DataListSource(tmp_path / "list.txt", limit=2).num_samples == 2


# --------------------------------------------------------------------------------------------------------------------
# inputs against the model
# --------------------------------------------------------------------------------------------------------------------


def test_check_inputs_accepts_fitting_batches():
    bound = check_inputs(TwoInputs(), {"image": torch.zeros(1, 4), "mask": torch.zeros(1, 5)})
    assert list(bound.arguments) == ["image", "mask"]
    assert list(check_inputs(TwoInputs(), ((torch.zeros(1, 4), torch.zeros(1, 5)),)).arguments) == ["image", "mask"]
    assert list(check_inputs(nn.Linear(4, 2), (torch.zeros(1, 4), torch.zeros(1))).arguments) == ["input"]
    sig = inspect.signature(lambda x, y=1: None)
    assert list(check_inputs(sig, torch.zeros(1)).arguments) == ["x"]


def test_check_inputs_names_the_mismatch():
    with pytest.raises(TypeError, match=r"inputs Tensor\(1, 4\) do not fit TwoInputs\.forward\(image, mask\): "
                                        r"missing a required argument: 'mask'"):
        check_inputs(TwoInputs(), torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"\{'image': .*'mask': .*'label': .*unexpected keyword argument 'label'"):
        check_inputs(TwoInputs(), {"image": torch.zeros(1), "mask": torch.zeros(1), "label": torch.zeros(1)})
    with pytest.raises(TypeError, match="too many positional arguments"):
        check_inputs(nn.Linear(4, 2), ((torch.zeros(1, 4), torch.zeros(1, 4)),))


def test_match_model_inputs_reads_one_batch(tmp_path):
    _pairs(tmp_path)
    (tmp_path / "list.txt").write_text("arrays/a0.npy,arrays/b0.npy\n")
    source = DataListSource(tmp_path / "list.txt")
    assert list(match_model_inputs(TwoInputs(), source).arguments) == ["image", "mask"]
    with pytest.raises(TypeError, match=r"do not fit Linear\.forward"):
        match_model_inputs(nn.Linear(4, 2), source)
    with pytest.raises(ValueError, match="yields no batch"):
        match_model_inputs(TwoInputs(), [])
    assert list(match_model_inputs(nn.Linear(4, 2), [[1, 2]], preprocess=lambda b: torch.zeros(1, 4)).arguments)


# --------------------------------------------------------------------------------------------------------------------
# the sources plug into calibrate_model
# --------------------------------------------------------------------------------------------------------------------


def test_calibrate_from_image_folder(tmp_path):
    _image_tree(tmp_path)
    source = ImageFolderSource(tmp_path, lambda im: to_tensor(im) / 255, batch_size=2)
    model = _conv_model()
    report = calibrate_model(model, source, progress=False)
    assert report.batches == 3
    expected = max(b.abs().max().item() for b in source)
    assert model[0].input_quantizer.amax.item() == pytest.approx(expected)


def test_calibrate_from_numpy_folder_npy_and_npz(tmp_path):
    (tmp_path / "npy").mkdir()
    data = np.random.default_rng(0).normal(size=(4, 3, 5, 6)).astype(np.float32)
    for i, x in enumerate(data):
        np.save(tmp_path / "npy" / f"{i}.npy", x)
    model = _conv_model()
    assert calibrate_model(model, NumpyFolderSource(tmp_path / "npy", batch_size=3), progress=False).batches == 2
    assert model[0].input_quantizer.amax.item() == pytest.approx(float(np.abs(data).max()))

    (tmp_path / "npz").mkdir()
    for i in range(3):
        np.savez(tmp_path / "npz" / f"{i}.npz", mask=np.full(5, i + 1, np.float32), image=np.full(4, -i, np.float32))
    model = TwoInputs()
    replace_to_quantization_module(model)
    source = NumpyFolderSource(tmp_path / "npz", batch_size=2)
    match_model_inputs(model, source)
    calibrate_model(model, source, progress=False)
    assert model.b.input_quantizer.amax.item() == 3.0 and model.a.input_quantizer.amax.item() == 2.0


def test_calibrate_from_data_list_two_positional_inputs(tmp_path):
    _pairs(tmp_path)
    (tmp_path / "list.txt").write_text("# image, mask\narrays/a0.npy,arrays/b0.npy\narrays/a2.npy,arrays/b1.npy\n")
    model = TwoInputs()
    replace_to_quantization_module(model)
    report = calibrate_model(model, DataListSource(tmp_path / "list.txt", batch_size=1), progress=False)
    assert report.batches == 2
    assert model.a.input_quantizer.amax.item() == 2.0 and model.b.input_quantizer.amax.item() == 11.0
