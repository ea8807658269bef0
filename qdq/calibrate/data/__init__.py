"""Calibration data from files: image folders, folders of NumPy arrays and data lists.

:func:`qdq.calibrate_model` takes any iterable of batches. The sources here turn the usual calibration sets into
such iterables, reading a batch at a time (never the whole set) and starting over on every ``iter()``, so one
source can serve several calibrations:

======================================  =============================================================================
source                                  what one sample is
======================================  =============================================================================
:class:`ImageFolderSource`              an image file, read with PIL and turned into a tensor by ``preprocess``
                                        (flat folders and ImageNet-style ``class/xxx.jpg`` trees alike)
:class:`NumpyFolderSource`              an ``.npy`` file (one input) or an ``.npz`` file (several named inputs), as
                                        tpu-mlir's ``run_calibration.py --dataset``
:class:`DataListSource`                 a line of a text file: comma-separated paths, one per model input, as
                                        tpu-mlir's ``--data_list``
======================================  =============================================================================

Batches come in the forms :func:`qdq.calibrate_model` passes on to the model:

* one input per sample: a tensor ``[B, ...]``, passed as the single argument;
* named inputs (an ``.npz`` file, or ``names=`` / ``input_names=``): a dict ``{name: tensor [B, ...]}``, passed as
  keyword arguments;
* several unnamed inputs (``a.npy,b.npy`` lines): a 1-tuple ``((x1, x2),)``. ``calibrate_model`` takes the first
  item of a tuple as the model input and passes a tuple input as positional arguments, so this is ``model(x1, x2)``.

Samples are stacked along a new first dimension. Files that already hold a batch dimension - tpu-mlir's inputs are
saved at the model's input shape, ``[1, 3, H, W]`` - take ``has_batch_dim=True`` and are concatenated along it.

Everything that can be checked before the first batch is: folders exist and hold files of one kind, data-list paths
exist and every line has as many inputs as the first, ``.npz`` files share their keys, and, when samples are batched
(``batch_size > 1``), array shapes and dtypes agree (read from the file headers, without loading the data). With
``batch_size=1`` shapes may vary between samples (dynamic-shape models). Errors name the file, and for data lists
the line, at fault. :func:`check_inputs` and :func:`match_model_inputs` compare a batch with the model's ``forward``
signature before any calibration work is done.

Where things are: :mod:`~qdq.calibrate.data.sources` (the folder sources and their base),
:mod:`~qdq.calibrate.data.data_list`, :mod:`~qdq.calibrate.data.files` (reading and checking files),
:mod:`~qdq.calibrate.data.input_check`; every public name is importable from ``qdq.calibrate.data``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> import torch
    >>> from qdq import calibrate_model, quant_modules
    >>> from qdq.calibrate.data import DataListSource, NumpyFolderSource, match_model_inputs
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = Path(tmp.name)
    >>> for i in range(5):
    ...     np.save(root / f"sample_{i}.npy", np.random.rand(3, 8, 8).astype(np.float32))
    >>> source = NumpyFolderSource(root, batch_size=2)
    >>> len(source), [tuple(b.shape) for b in source]
    (3, [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)])
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> _ = quant_modules.replace_to_quantization_module(model)
    >>> _ = match_model_inputs(model, source)            # one argument, one input: fine
    >>> calibrate_model(model, source, progress=False).batches
    3
    >>> _ = (root / "list.txt").write_text("# sample, one per line\\nsample_0.npy\\n\\nsample_3.npy\\n")
    >>> [tuple(b.shape) for b in DataListSource(root / "list.txt", batch_size=2)]
    [(2, 3, 8, 8)]
    >>> tmp.cleanup()
"""

from qdq.calibrate.data.data_list import DataListSource
from qdq.calibrate.data.files import IMAGE_EXTENSIONS, DataSourceError
from qdq.calibrate.data.input_check import check_inputs, match_model_inputs
from qdq.calibrate.data.sources import ImageFolderSource, NumpyFolderSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSourceError",
    "ImageFolderSource",
    "NumpyFolderSource",
    "DataListSource",
    "check_inputs",
    "match_model_inputs",
]
