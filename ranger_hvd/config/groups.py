"""Config groups: a section whose selector key (``compression.type``) picks one of several models.

As in a Hydra config group, the options belong to the member that defines them.  A config written for
one member keeps working when the selector is switched by an override or a sweep: the options of the
other members become *inactive*.  They are still checked against the member that owns them (a bad value
stays an error, with its dotted path), then dropped from the resolved config; ``show`` lists them as
inactive.  A key that no member defines is an unknown key, as anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Field, Tag

# pydantic error type raised when the selector names no member (see translate.py)
UNKNOWN_MEMBER = "config_group_member"


@dataclass(frozen=True)
class Group:
    section: str                          # top-level section, e.g. "compression"
    key: str                              # the selector key inside it, e.g. "type"
    members: dict[str, type[BaseModel]]   # selector value -> the model of that member's options
    default: str                          # the member used when the selector is not given

    def selected(self, raw: Any) -> Any:
        """The member a raw section (a mapping, or an already built member) asks for."""
        if isinstance(raw, dict):
            return raw.get(self.key, self.default)
        return getattr(raw, self.key, None)

    def annotation(self) -> Any:
        """The field type of the section: a union of the members, told apart by the selector."""
        tagged = tuple(Annotated[model, Tag(name)] for name, model in self.members.items())
        return Annotated[Union[tagged], Discriminator(   # type: ignore[valid-type]
            self.selected, custom_error_type=UNKNOWN_MEMBER,
            custom_error_message=f"unknown {self.section}.{self.key}",
            custom_error_context={"choices": ", ".join(self.members)})]

    def field(self) -> Any:
        return Field(default_factory=lambda: self.members[self.default](**{self.key: self.default}))

    def options(self, member: str) -> list[str]:
        return [k for k in self.members[member].model_fields if k != self.key]

    def all_options(self) -> list[str]:
        seen: list[str] = []
        for name in self.members:
            seen += [k for k in self.options(name) if k not in seen]
        return seen

    def owners(self, option: str) -> list[str]:
        return [name for name in self.members if option in self.members[name].model_fields]

    def split(self, raw: dict) -> tuple[dict, dict[str, Any]]:
        """(the section with only the selected member's keys and unknown keys, {option: value} of the
        options that belong to other members only).  An unknown selector leaves the section as it is."""
        member = self.selected(raw)
        if not isinstance(member, str) or member not in self.members:
            return raw, {}
        own = set(self.members[member].model_fields)
        active, inactive = {}, {}
        for k, v in raw.items():
            if k in own or not self.owners(k):
                active[k] = v
            else:
                inactive[k] = v
        return active, inactive
