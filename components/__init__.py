"""KFP v2 components: one file per pipeline step, each a thin typed call into its step
(genreflow.steps), the function that `genreflow <step>` and the Python API call too.

Only the standard library and kfp at module level, so compiling never imports torch. Each
component imports genreflow inside its body: kfp.local runs it in the installed
environment, a cluster runs it in the image named in `images.py`.
"""
