"""Models over images of any size: the tiled streaming engine (`tiling`), image readers that
read a window at a time (`readers`), and streamed prediction of files into maps, pictures and
cells (`predict`).
"""
