"""edgekit: take a trained model to a fleet of edge devices and keep it honest there."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("edgekit")
except metadata.PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "convert"]


def convert(model, example_inputs=None, **options):  # noqa: ANN001, ANN201 - typed in converters.api.convert
    """Convert a model (path, Keras model or ``torch.nn.Module`` + ``example_inputs``) to INT8 bundles per profile.

    The conversion tools are imported only here, so ``import edgekit`` stays light on devices.
    See :func:`converters.api.convert` for the options.
    """
    from converters.api import convert as _convert

    return _convert(model, example_inputs, **options)
