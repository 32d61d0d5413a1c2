"""The real photos that ship inside installed wheels: usable offline, with no download.

scikit-image 0.26 carries nine RGB photos in ``skimage.data`` and scikit-learn two in
``load_sample_images()`` (see shared/NOTES.md). Synthetic pictures (colorwheel, logo) and
grey-scale ones are left out. Both packages are in the ``relaydiff[demo]`` extra.
"""
from __future__ import annotations

import os

import numpy as np

# name -> how to get it from skimage.data (a function name, or (function, index) for tuples)
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "retina": "retina",
    "immunohistochemistry": "immunohistochemistry",
    "motorcycle_left": ("stereo_motorcycle", 0),
    "motorcycle_right": ("stereo_motorcycle", 1),
}
# the files inside the scikit-image wheel: a version that lacks one would fetch it with pooch
_SKIMAGE_FILES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
                  "ihc.png", "motorcycle_left.png", "motorcycle_right.png")
_SKLEARN_PHOTOS = ("china", "flower")

BUNDLED_PHOTOS: tuple[str, ...] = tuple(_SKIMAGE_PHOTOS) + _SKLEARN_PHOTOS


def load_bundled_photos() -> dict[str, np.ndarray]:
    """The 11 bundled photos as ``name -> uint8 array [H, W, 3]`` (sizes differ, 300 to 1411 px).

    Raises ``ImportError`` naming the extra when scikit-image or scikit-learn is missing, and
    ``RuntimeError`` (never downloads) when the installed scikit-image does not ship a photo."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise ImportError("the bundled photos need scikit-image and scikit-learn: "
                          "pip install 'relaydiff[demo]'") from e
    folder = os.path.dirname(skimage.data.__file__)
    absent = [f for f in _SKIMAGE_FILES if not os.path.isfile(os.path.join(folder, f))]
    if absent:
        raise RuntimeError(f"scikit-image {skimage.__version__} does not ship {', '.join(absent)} in its wheel "
                           "(relaydiff downloads nothing); install a release that does, e.g. scikit-image==0.26.0")
    photos: dict[str, np.ndarray] = {}
    for name, how in _SKIMAGE_PHOTOS.items():
        fn, index = (how, None) if isinstance(how, str) else how
        img = getattr(skimage.data, fn)()
        photos[name] = np.ascontiguousarray(img if index is None else img[index])
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images):
        name = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if name in _SKLEARN_PHOTOS:
            photos[name] = np.ascontiguousarray(img)
    missing = set(BUNDLED_PHOTOS) - set(photos)
    if missing:
        raise RuntimeError(f"bundled photos not found in the installed packages: {sorted(missing)}")
    return {name: photos[name] for name in BUNDLED_PHOTOS}
