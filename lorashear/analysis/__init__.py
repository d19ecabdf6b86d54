"""Facts computed from a module: dimension coupling, removable groups, masks, saliency scores
and the allocation of a pruning ratio to group families.

:mod:`.manager` holds the lazily cached analyses a pass asks for; :mod:`.coupling` finds the
minimally removable groups by union-find over the per-kind rules of :mod:`.coupling_rules`
(which axes an op ties together, or a pin with its reason) and proves removed slices zero
with :mod:`.zero_rules` (:mod:`.groups` is their typed attribute); :mod:`.masking` zeroes and
restores units; :mod:`.saliency` scores groups and :mod:`.scores` stores the scores;
:mod:`.knowledge` is the knowledge-distribution attribute that :mod:`.allocation` reads when it
turns a ratio into the units to remove. Sits above :mod:`lorashear.runtime` (it runs models to
score them) and below :mod:`lorashear.training` and the passes.
"""
