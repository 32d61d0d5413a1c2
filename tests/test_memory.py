"""Memory that must not grow with the data (issue 13): the frequency study streams its images
batch by batch, sizing a zip dataset reads only the members' headers, and a very wide image
is cropped to its centre square before any conversion.

Oracles: the whole-batch computation of the study written out here (the curves as the paper
defines them, from one batch), bytes counted on the zip file itself, and the uncropped
decode path ``center_square(image_array(...))`` for pixel equality.
"""
from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import relaydiff.analysis.noise_study as noise_study
import relaydiff.analysis.photos as photos_mod
import relaydiff.cli.analyze as analyze_cli
from relaydiff.analysis import (NOISE_KINDS, bin_mean, dct2, frequency_study, frequency_study_stream,
                                low_resolution, make_noise, photo_batch, photo_batches, radial_bins)
from relaydiff.cli import main
from relaydiff.data.dataset import ImageDataset
from relaydiff.images import ImageError, center_square, image_array, open_image, square_array


# ------------------------------------------------------------------ the frequency study, streamed

def _whole_batch_study(images, sigmas, factor, block_size, num_bins, seed):
    """The study's curves from one batch, as frequency_study computed them before streaming:
    bin means of ``U^2`` over the whole batch, noise drawn for the whole batch at once."""
    high = images.to(torch.float64)
    bins = radial_bins(*high.shape[-2:], num_bins=num_bins)
    u_img = {"high": dct2(high), "low": dct2(low_resolution(high, factor))}
    curves = {res: bin_mean(u ** 2, bins) for res, u in u_img.items()}
    for kind in NOISE_KINDS:
        u_noise = dct2(make_noise(kind, high.shape, factor, block_size, seed))
        curves[kind] = bin_mean(u_noise ** 2, bins)
        u = u_img["low" if kind == "white_low" else "high"]
        for s in sigmas:
            curves[(kind, s)] = bin_mean((u + s * u_noise) ** 2, bins)
    return curves


def _smooth_images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64).cumsum(-1).cumsum(-2)
    return x / x.abs().amax()


@pytest.mark.parametrize("factor,block_size", [(4, 4), (2, 3)])
def test_make_noise_start_is_a_slice_of_the_whole_batch(factor, block_size):
    shape = (5, 3, 24, 40)
    for kind in NOISE_KINDS:
        whole = make_noise(kind, shape, factor, block_size, seed=9)
        for start, b in ((0, 2), (2, 3), (4, 1)):
            part = make_noise(kind, (b, *shape[1:]), factor, block_size, seed=9, start=start)
            torch.testing.assert_close(part, whole[start:start + b], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="start must be a non-negative integer"):
        make_noise("white", shape, start=-1)
    with pytest.raises(ValueError, match="seed must be an integer when start > 0"):
        make_noise("block", shape, seed=None, start=1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
@pytest.mark.parametrize("factor,block_size", [(4, 4), (2, 3)])
def test_streamed_study_equals_the_whole_batch(chunk, factor, block_size):
    n, sigmas, bins = 7, (0.2, 1.5), 12
    images = _smooth_images(n, 24, 40)
    expected = _whole_batch_study(images, sigmas, factor, block_size, bins, seed=4)
    study = frequency_study_stream((images[i:i + chunk] for i in range(0, n, chunk)), sigmas=sigmas,
                                   factor=factor, block_size=block_size, num_bins=bins, seed=4)
    assert study.num_images == n and study.resolution == (24, 40) and study.sigmas == sigmas
    curves = {**study.image_psd, **study.noise_psd, **study.noisy_psd}
    assert set(curves) == set(expected)
    for key, want in expected.items():
        np.testing.assert_allclose(curves[key], want, rtol=1e-11, atol=0, err_msg=str(key))
    for kind in NOISE_KINDS:
        res = "low" if kind == "white_low" else "high"
        for s in sigmas:
            np.testing.assert_allclose(study.snr[(kind, s)], np.sqrt(expected[res] / expected[kind]) / s,
                                       rtol=1e-11)
    # the one-batch entry point gives the same curves
    whole = frequency_study(images, sigmas=sigmas, factor=factor, block_size=block_size, num_bins=bins, seed=4)
    assert whole.num_images == n
    for kind in NOISE_KINDS:
        np.testing.assert_allclose(whole.noise_psd[kind], expected[kind], rtol=1e-11)


def test_streamed_study_validates_its_batches():
    x = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="no images given"):
        frequency_study_stream([])
    with pytest.raises(ValueError, match=r"batch 1 must be \[b, 3, 16, 16\] like the first"):
        frequency_study_stream([x, torch.zeros(1, 3, 16, 20)])
    with pytest.raises(ValueError, match=r"batch 0 must be \[B, C, H, W\]"):
        frequency_study_stream([x[0]])
    with pytest.raises(ValueError, match="multiples of factor=3"):
        frequency_study_stream([x], factor=3)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        frequency_study_stream([x], sigmas=(1.0, -1.0))


def test_photo_batches_read_lazily_and_concatenate_to_photo_batch():
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8) for i in range(7)]
    pulled = []

    def source():
        for p in photos:
            pulled.append(1)
            yield p

    batches = photo_batches(source(), 16, batch_size=3)
    first = next(batches)
    assert first.shape == (3, 3, 16, 16) and len(pulled) == 3     # nothing read ahead of the batch
    rest = list(batches)
    assert [b.shape[0] for b in rest] == [3, 1]
    assert torch.equal(torch.cat([first, *rest]), photo_batch(photos, 16))
    with pytest.raises(ValueError, match="no images given"):
        list(photo_batches(iter([]), 16))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        photo_batches(photos, 16, batch_size=0)


def test_cli_analyze_streams_its_photos(tmp_path, monkeypatch):
    """``relaydiff analyze`` never holds more than one batch of photos, and its numbers are
    those of the study on all the photos at once."""
    from relaydiff.metrics.images import FolderSource
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(7):
        smooth = np.cumsum(np.cumsum(rng.standard_normal((70 + 3 * i, 90, 3)), 0), 1)
        arrays.append((255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8))
        Image.fromarray(arrays[-1]).save(folder / f"p{i}.png")

    reads, largest, reads_at_first_dct = [0], [0], []
    real_read, real_dct2, real_to_batch = FolderSource.read_square, noise_study.dct2, photos_mod._to_batch

    def read(self, i, size):
        reads[0] += 1
        return real_read(self, i, size)

    def dct2_spy(x):
        largest[0] = max(largest[0], x.shape[0])
        if not reads_at_first_dct:
            reads_at_first_dct.append(reads[0])
        return real_dct2(x)

    def to_batch(squares):
        largest[0] = max(largest[0], len(squares))
        return real_to_batch(squares)

    monkeypatch.setattr(FolderSource, "read_square", read)
    monkeypatch.setattr(noise_study, "dct2", dct2_spy)
    monkeypatch.setattr(photos_mod, "_to_batch", to_batch)
    monkeypatch.setattr(analyze_cli, "BATCH_PIXELS", 3 * 64 * 64 + 5)      # 3 photos a batch at 64 px
    out = tmp_path / "out"
    assert main(["analyze", "--images", str(folder), "--out", str(out), "--resolution", "64",
                 "--sigmas", "0.5,2", "--bins", "16", "--seed", "3", "--quiet"]) == 0
    assert reads[0] == 7 and largest[0] == 3 and reads_at_first_dct == [3]

    monkeypatch.undo()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 7
    whole = frequency_study(photo_batch(arrays, 64), sigmas=(0.5, 2.0), num_bins=16, seed=3).claims()
    for key, value in whole.items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key


def test_cli_analyze_unreadable_photo_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["analyze", "--images", str(folder), "--out", str(out), "--resolution", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relaydiff analyze: error:") and "b.png" in err and "\n" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------ zip datasets: sizing reads headers only

class _CountingFile(io.RawIOBase):
    """A file that counts the bytes read from it."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def readinto(self, b):
        data = self._f.read(len(b))
        b[:len(data)] = data
        self.bytes_read += len(data)
        return len(data)

    def close(self):
        self._f.close()
        super().close()


def test_sizing_a_zip_dataset_reads_only_headers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(6):
            noise = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)     # incompressible: ~0.8 MB a PNG
            buf = io.BytesIO()
            Image.fromarray(noise).save(buf, "PNG" if i % 3 else "JPEG", **({} if i % 3 else {"quality": 95}))
            z.writestr(f"img{i}.{'png' if i % 3 else 'jpg'}", buf.getvalue())
    with zipfile.ZipFile(path) as z:
        sizes = {info.filename: info.compress_size for info in z.infolist()}
    files = []
    real_zipfile = zipfile.ZipFile

    def counting_zipfile(file, *args, **kwargs):
        files.append(_CountingFile(file))
        return real_zipfile(files[-1], *args, **kwargs)

    import relaydiff.data.dataset as dataset_mod
    monkeypatch.setattr(dataset_mod.zipfile, "ZipFile", counting_zipfile)
    ds = ImageDataset(path, 64, cache=False)          # lists the members and checks every size
    sized = sum(f.bytes_read for f in files)
    assert len(ds.source.names) == 6 and sum(sizes.values()) > 6 * 300_000
    assert sized < 0.02 * sum(sizes.values()), (sized, sizes)
    # the counter sees a decode: a whole member is read then
    ds[0]
    assert sum(f.bytes_read for f in files) - sized >= sizes[ds.source.names[0]]
    for f in files:
        f.close()


def test_sizing_a_zip_dataset_still_rejects_small_images(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, size in (("a.png", (80, 80)), ("b.png", (80, 40))):
            buf = io.BytesIO()
            Image.new("RGB", size).save(buf, "PNG")
            z.writestr(name, buf.getvalue())
    with pytest.raises(ValueError, match=r"'b.png' is 80x40, smaller than the resolution 64x64"):
        ImageDataset(path, 64, cache=False)


# ------------------------------------------------------------------ wide images: crop before converting

def _odd_images(tmp_path):
    """PNG/JPEG files of every mode the decode path treats differently, odd sizes, both orientations."""
    rng = np.random.default_rng(3)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)   # noqa: E731
    pal = Image.fromarray(u8(45, 30) % 16, "L").convert("P")
    pal.putpalette(list(u8(16 * 3)))
    pal.info["transparency"] = 3
    ims = {
        "rgb_wide.png": Image.fromarray(u8(37, 53, 3)),
        "rgb_tall.png": Image.fromarray(u8(53, 37, 3)),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (41, 29), dtype=np.uint16)),
        "palette.png": pal,
        "rgba.png": Image.fromarray(u8(33, 50, 4), "RGBA"),
        "la.png": Image.fromarray(u8(47, 33, 2), "LA"),
        "grey_square.png": Image.fromarray(u8(40, 40)),
        "bits.png": Image.fromarray(u8(31, 45) > 127),
        "cmyk.jpg": Image.fromarray(u8(28, 70, 4), "CMYK"),
    }
    paths = []
    for name, im in ims.items():
        im.save(tmp_path / name, **({"transparency": 3} if name == "palette.png" else {}))
        paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize("size", [16, 28, 29])
def test_square_array_equals_the_uncropped_pipeline(tmp_path, size):
    modes = set()
    for path in _odd_images(tmp_path):
        with open_image(path, path.name) as im:
            modes.add(im.mode)
            h, w = im.height, im.width
            if min(h, w) < size:
                continue
            old = center_square(image_array(im, path.name), size)
        with open_image(path, path.name) as im:
            new = square_array(im, path.name, size)
        assert new.dtype == np.uint8 and new.shape == (size, size, 3), path.name
        assert np.array_equal(new, old), path.name
    assert {"RGB", "I;16", "P", "RGBA", "LA", "L", "1", "CMYK"} <= modes


def _spy_on_convert(monkeypatch) -> list:
    """Record the size of every image PIL converts (the conversions are the scratch)."""
    converted = []
    real_convert = Image.Image.convert

    def convert(self, *args, **kwargs):
        converted.append(self.size)
        return real_convert(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", convert)
    return converted


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_wide_image_converts_only_its_centre_square(tmp_path, monkeypatch, mode):
    rng = np.random.default_rng(0)
    h, w = 100, 8000
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if mode == "RGB" \
        else rng.integers(0, 65536, (h, w), dtype=np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(a).save(path)
    with open_image(path, "wide") as im:
        old = center_square(image_array(im, "wide"), 32)

    converted = _spy_on_convert(monkeypatch)
    with open_image(path, "wide") as im:
        assert im.mode == mode
        im.load()                                  # the decode itself is the file's, either way
        tracemalloc.start()
        try:
            new = square_array(im, "wide", 32)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert np.array_equal(new, old)
    assert converted and all(s == (h, h) for s in converted), converted
    full_rgb = h * w * 3                           # what converting the whole strip allocates (at least)
    assert peak < full_rgb / 4, (peak, full_rgb)


def test_dataset_decodes_wide_images_through_the_square(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, (70, 3000, 3), dtype=np.uint8)
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 65536, (900, 80), dtype=np.uint16)).save(folder / "tall16.png")
    expected = {}
    for name in ("tall16.png", "wide.png"):
        with open_image(folder / name, name) as im:
            expected[name] = center_square(image_array(im, name), 64).transpose(2, 0, 1)
    converted = _spy_on_convert(monkeypatch)
    ds = ImageDataset(folder, 64, xflip=False, cache=False)
    items = [ds[i][0].numpy() for i in range(2)]
    monkeypatch.undo()
    assert ds.source.names == ["tall16.png", "wide.png"]
    for name, item in zip(ds.source.names, items):
        assert np.array_equal(item, expected[name]), name
    assert converted == [(80, 80), (70, 70)], converted


def test_square_array_names_a_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (40, 400, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with open_image(path, "data: 'wide.png'") as im:
        with pytest.raises(ImageError, match=r"data: 'wide.png': corrupt or truncated image"):
            square_array(im, "data: 'wide.png'", 32)


def test_image_sources_read_the_centre_square_like_the_full_read(tmp_path):
    """``read_square`` (what ``relaydiff analyze`` reads) equals ``center_square(read(i))`` for
    folders and zips, wide, tall and 16-bit images, while converting only the square."""
    from relaydiff.images import center_square
    from relaydiff.metrics.images import open_images
    g = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(g.integers(0, 256, (40, 300, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(g.integers(0, 256, (260, 33, 3), dtype=np.uint8)).save(folder / "tall.png")
    Image.fromarray(g.integers(0, 65536, (50, 90), dtype=np.uint16)).save(folder / "grey16.png")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    for path in (folder, tmp_path / "imgs.zip"):
        source = open_images(str(path), "--images")
        for i in range(len(source)):
            for size in (16, 32):
                assert np.array_equal(source.read_square(i, size), center_square(source.read(i), size)), (path, i)
