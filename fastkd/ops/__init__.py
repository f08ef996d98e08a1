"""Python-side registrations of fastkd's custom operators (fake kernels for torch.compile and autograd
formulas). Imported by fastkd once the compiled library has been loaded."""

from fastkd.ops import kd  # noqa: F401
