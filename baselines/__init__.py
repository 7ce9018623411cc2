"""Comparison methods. Each is one file registered by name with ``@register_method``; importing this
package registers all of them. Same engine, quantizers and data path as CMT-KD."""
from baselines import dml, fp, kd, kd_at, mtkd, qat  # noqa: F401
