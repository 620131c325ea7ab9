"""A CUDA stand-in for machines without a GPU (no GPU is lent to this project's CI).

Inside ``with FakeCuda():`` tensors "on the device" are CPU tensors of the marker subclass
:class:`OnDevice`, and a torch function mode enforces what CUDA enforces: no numpy view of
device memory (``.numpy()`` / ``np.asarray`` raise), no op mixing device tensors with host
tensors (other than 0-dim ones, and indexing/copies, which CUDA allows), ``.device`` says
``cuda:0``, ``Module.to("cuda")`` gives modules device parameters, factories called with
``device="cuda"`` make device tensors. Host code that forgets a ``.cpu()`` fails here as it
would on a GPU. ``host_ops`` lists large host-side ops (``large`` elements or more), so a test
can check that heavy work stayed on the device.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda", 0)


class OnDevice(torch.Tensor):
    """Marker: a tensor the simulator treats as living in GPU memory."""

    __torch_function__ = torch._C._disabled_torch_function_impl


class HostDeviceError(RuntimeError):
    """What CUDA would have raised."""


def on_device(t) -> bool:
    return isinstance(t, OnDevice)


def _plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, OnDevice) else x


def _mark(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice):
        if isinstance(x, torch.nn.Parameter):  # Module.to: the module re-wraps it as a Parameter
            x = x.detach()
        return x.as_subclass(OnDevice)
    return x


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


# Functions CUDA lets mix devices (CPU indices into device tensors, cross-device copies) or that
# only compare metadata.
_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_,
                   torch._has_compatible_shallow_copy_type}


class FakeCuda(TorchFunctionMode):
    def __init__(self, large: int | None = None):
        super().__init__()
        self.large = large
        self.device_ops = 0
        self.host_ops: list[tuple[str, int]] = []

    def __enter__(self):
        # Module.to(cuda) must give modules parameters of the marker type, not rewrite .data
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        owner = getattr(func, "__self__", None)
        if owner is torch._C.TensorBase.device:
            return DEVICE if on_device(args[0]) else torch.device("cpu")
        if owner is torch._C.TensorBase.is_cuda:
            return on_device(args[0])
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and on_device(args[0]):
            raise HostDeviceError("can't convert cuda:0 device type tensor to numpy. "
                                  "Use Tensor.cpu() to copy the tensor to host memory first.")
        if func is torch.Tensor.cpu:
            return _plain(args[0])
        if func is torch.Tensor.cuda:
            return _mark(_plain(args[0]).clone())
        target = None  # where the result goes when the call names a device
        if "device" in kwargs:
            target = "cuda" if _is_cuda(kwargs["device"]) else "cpu"
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            rest = []
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target, a = ("cuda" if _is_cuda(a) else "cpu"), torch.device("cpu")
                elif isinstance(a, torch.Tensor):
                    target, a = ("cuda" if on_device(a) else "cpu"), a.dtype
                rest.append(a)
            args = (args[0], *rest)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        dev = [t for t in tensors if on_device(t)]
        host = [t for t in tensors if not on_device(t) and t.dim() > 0]
        if dev and host and target is None and func not in _MIXING_ALLOWED:
            raise HostDeviceError(
                f"{name}: expected all tensors to be on the same device, but found at least two devices, "
                f"cuda:0 and cpu! (host {[tuple(t.shape) for t in host]}, device {[tuple(t.shape) for t in dev]})")
        args, kwargs = tree_map(_plain, (args, kwargs))
        out = func(*args, **kwargs)
        if target == "cpu":
            return out
        if target == "cuda" or dev:
            self.device_ops += 1
            return out if func is torch.Tensor.__setitem__ else tree_map(_mark, out)
        if self.large is not None:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            biggest = max((t.numel() for t in tensors + outs), default=0)
            if biggest >= self.large:
                self.host_ops.append((name, biggest))
        return out
