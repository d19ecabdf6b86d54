"""What the training passes (``lhspg``, ``recover``) share: the device, precision and
data-parallel runtime (:mod:`.runtime`) and their mid-pass checkpoints (:mod:`.checkpoint`).

Above :mod:`lorashear.analysis` and :mod:`lorashear.runtime`, below :mod:`lorashear.passes`.
"""
