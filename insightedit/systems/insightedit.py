"""The InsightEdit system: :class:`insightedit.systems.editor_system.EditorSystem` with ``member: insightedit``.

Kept so that configs naming ``insightedit.systems.insightedit.InsightEditSystem`` keep working.
"""

from insightedit.systems.editor_system import EditorSystem, InsightEditSystem

__all__ = ["EditorSystem", "InsightEditSystem"]
