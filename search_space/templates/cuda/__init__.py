"""CUDA schedule templates, one module each (``search_space.templates.MODULES`` says which
registers which; importing a module registers its templates).

Rendering is pure text (CUDA C following the conventions in ``search_space.codegen.cuda``);
building needs nvcc, running needs a GPU and pycuda.
"""
