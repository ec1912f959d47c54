"""The applications built on the library: the ``tl-plugin`` command line, loading a user's data, the tasks
(text, token, image and audio classification), reports, and the bundled demo's data.

Layering: this subpackage imports the library (`tl_plugin.discovery`, `tl_plugin.freezing`, `tl_plugin.config`,
`tl_plugin.transfer`, `tl_plugin.optim`, `tl_plugin.callbacks`, `tl_plugin.cache` ...); the library never imports
it (``tests/test_layering.py`` checks the import graph).
"""
