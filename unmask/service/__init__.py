"""The detection service (``serve.py``): a checkpoint behind HTTP on LitServe.

``uploads``: the door. An ASGI middleware in front of LitServe's routes checks the API key,
the content type, the body size and the number of files, writes the uploads to a private
temporary folder under names it makes itself, and hands LitServe's handler a JSON list of
those files; the folder is removed when the response has gone. ``api``: the ``LitAPI`` of
the inference workers: the scorer of infer.py on the uploads, one JSON entry per file.
"""
