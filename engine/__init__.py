"""Dancing Avatar engine: pose- and text-guided human motion video with an image diffusion model.

Pure torch + diffusers; knows nothing of Ray. One render runs end to end in one process through
:func:`engine.render.render`.
"""

__version__ = "0.1.0"
