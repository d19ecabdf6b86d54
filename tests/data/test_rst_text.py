"""reStructuredText to plain text: prose kept, Sphinx markup gone, code kept verbatim."""

from __future__ import annotations

from lorashear.data.rst import inline_to_text, rst_to_text

PAGE = """\
:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode.

.. index:: single: JSON

**Source code:** :source:`Lib/json/__init__.py`

--------------

`JSON <https://json.org>`_, specified by :rfc:`7159`, is a *lightweight*
format [#errata]_ used by :func:`~json.dumps` and
:ref:`the conversion table <py-to-json-table>`.

.. warning::
   Be cautious with untrusted data.

Encoding hierarchies::

    >>> import json
    >>> def f(x):
    ...     return x

.. function:: dumps(obj, *, skipkeys=False, \\
              indent=None)
   :noindex:

   Serialize *obj* to a ``str``.

   .. versionchanged:: 3.6
      All optional parameters are keyword-only.

- first item that is
  wrapped
- second item

:Author: Someone

.. _target-label:

.. toctree::
   :maxdepth: 2

   other/page

.. code-block:: c

   int main(void)
   {
       return 0;
   }

.. this is a comment
   spanning lines

+-------+---------+
| Name  | Meaning |
+=======+=========+
| ``a`` | first   |
+-------+---------+

=====  =====
col 1  col 2
=====  =====
x      y
=====  =====

.. [#errata] A footnote with text.
"""


def test_page_converts_to_clean_text():
    text = rst_to_text(PAGE)
    assert text.splitlines() == [
        "json --- JSON encoder",
        "Source code: Lib/json/__init__.py",
        "JSON, specified by RFC 7159, is a lightweight format used by dumps and the conversion "
        "table.",
        "Be cautious with untrusted data.",
        "Encoding hierarchies:",
        ">>> import json",
        ">>> def f(x):",
        "...     return x",
        "dumps(obj, *, skipkeys=False, indent=None)",
        "Serialize obj to a str.",
        "Changed in version 3.6: All optional parameters are keyword-only.",
        "- first item that is wrapped",
        "- second item",
        "Author: Someone",
        "int main(void)",
        "{",
        "    return 0;",
        "}",
        "Name | Meaning",
        "a | first",
        "col 1 col 2",
        "x y",
        "A footnote with text.",
    ]


def test_malformed_literal_block_does_not_swallow_the_page():
    page = "Use it::\n\n#define A 1\n\nNext section\n------------\n\n.. kernel-doc:: x.h\n"
    assert rst_to_text(page).splitlines() == ["Use it:", "#define A 1", "Next section"]


def test_literal_block_inside_a_list_item_ends_with_the_item():
    page = "* Added escapes in\n  regexes::\n\n    >>> x = 1\n    1\n\n  (Contributed by Someone.)\n"
    assert rst_to_text(page).splitlines() == ["* Added escapes in regexes:", ">>> x = 1", "1",
                                              "(Contributed by Someone.)"]


def test_inline_markup():
    assert inline_to_text(r"a ``x*y*z`` and *b* and **c** and \*d\*") == "a x*y*z and b and c and *d*"
    assert inline_to_text(":pep:`8` and :c:func:`!PyObject_New` and |release|") == \
        "PEP 8 and PyObject_New and release"
    assert inline_to_text("see `Python`_ and `home <https://x>`__ and f(*args, **kw)") == \
        "see Python and home and f(*args, **kw)"
    assert inline_to_text("__init__ stays, snake_case_ stays") == "__init__ stays, snake_case stays"
