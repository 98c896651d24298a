"""The built-in studies, registered with `iclsft.study` (which imports this package on its first lookup):
the 2D linear study (`linear2d`: ICL and SFT arms, RSA; SPEC §2-§7) and the implicit-pattern suite
(`implicit`: ICL and fine-tuning arms, circuit shift; SPEC §8). Each module assembles its study from the
layers below; a study of your own is assembled the same way (tests/test_study.py registers a toy one)."""

from iclsft.studies import implicit, linear2d
from iclsft.study import register

register(linear2d.STUDY)
register(implicit.STUDY)
