"""The dataset registry: every fact about the supported datasets, stated once.

Names, class names and image shapes (`DatasetSpec`), the IDX file names, the mirrors and
checksums tensorflow-datasets registers, the canonical MNIST MD5s, and the data sources. Only the
stdlib is imported here, so `mnist_jax.config` can validate flags without loading numpy.
"""

from __future__ import annotations

import dataclasses

from mnist_jax.errors import UserError

SOURCES = ("auto", "local", "download", "tfds")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What consumers of a dataset need to know about its examples, without loading it.

    ``image_shape`` is (H, W, C): the model, evaluation padding and figures read it instead of
    assuming 28x28 grayscale.
    """

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def height(self) -> int:
        return self.image_shape[0]

    @property
    def width(self) -> int:
        return self.image_shape[1]

    @property
    def channels(self) -> int:
        return self.image_shape[2]


# Every registered dataset is 28x28 grayscale, the shape its IDX files declare.
_GRAYSCALE_28 = (28, 28, 1)

_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", tuple(str(d) for d in range(10)), _GRAYSCALE_28),
        DatasetSpec(
            "fashion_mnist",
            (
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            _GRAYSCALE_28,
        ),
        DatasetSpec(
            "kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), _GRAYSCALE_28
        ),
    )
}
DATASETS = tuple(_SPECS)
CLASS_NAMES: dict[str, tuple[str, ...]] = {name: s.class_names for name, s in _SPECS.items()}


def check_name(name: str) -> None:
    """Raises a `UserError` unless `name` is a known dataset."""
    if name not in _SPECS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def spec(name: str) -> DatasetSpec:
    """The registered spec of `name`; an unknown name is a one-line `UserError`."""
    check_name(name)
    return _SPECS[name]


# (split, kind) -> file name without ".gz", in the order files are listed and hashed.
FILE_STEMS: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# The mirrors and checksums registered by tensorflow-datasets 4.9
# (image_classification/mnist.py and url_checksums/{mnist,fashion_mnist,kmnist}.txt).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/",),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
}
# dataset -> {file name: (size in bytes, SHA-256)} of the gzipped files the mirrors serve.
CHECKSUMS: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels-idx1-ubyte.gz": (
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "t10k-images-idx3-ubyte.gz": (
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte.gz": (
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "t10k-images-idx3-ubyte.gz": (
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
    "kmnist": {
        "train-images-idx3-ubyte.gz": (
            18165135,
            "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        ),
        "train-labels-idx1-ubyte.gz": (
            29497,
            "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        ),
        "t10k-images-idx3-ubyte.gz": (
            3041136,
            "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            5120,
            "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
        ),
    },
}
# MD5 of the canonical uncompressed MNIST files. The .gz bytes of a legitimate copy may differ
# (recompressed), the content may not; a mismatch is worth a warning, not a refusal.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
