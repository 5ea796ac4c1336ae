"""What every figure of the package shares: tick labels that read as the values themselves."""

from __future__ import annotations


def plain_ticks(*axes) -> None:
    """Turn off matplotlib's tick offset on the linear axes of ``axes``.

    Energies of one molecule differ in the fourth significant digit (−4210.31, −4210.29 eV);
    by default matplotlib then labels ticks 0.01, 0.03 with "−4.21e3" written beside the axis,
    which is easy to misread. Log axes have no offset and are left as they are.
    """
    for ax in axes:
        for which in ("x", "y"):
            try:
                ax.ticklabel_format(axis=which, useOffset=False)
            except AttributeError:  # not a ScalarFormatter (a log axis): nothing to turn off
                pass
