"""The API path families: one table from which the generation routes, the fetch URL of every
job, the storage deploy type of its images and the enterprise admin servers are all derived
(``api.modelslab`` builds the routes; ``api.answers`` the fetch URLs; ``storage.configs`` reads
the deploy types). A family is one entry, so it can't be half-added.

Each ModelsLab "server" is a path prefix with generation actions (``text2img``, ``img2img``,
``inpaint``, or v7's spelled-out names), a fetch route, and for enterprise servers the admin
actions. An action either always uses one model (the enterprise servers are dedicated boxes:
``model_id`` is ignored there) or takes ``model_id`` from the body (v6/v7 images, the SDK's
enterprise ``images`` server), with a default when none is sent. Model ids are resolved through
the registry, aliases included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fluxserve.api.schemas import MIN_SIDE, REALTIME_MIN_SIDE, SIDE_MULTIPLE
from fluxserve.engine.families.base import Task
from fluxserve.models import DEFAULT_REGISTRY


@dataclass(frozen=True)
class Action:
    """One generation route: ``<prefix>/<name>``."""

    name: str  # the last path segment, e.g. "text2img" or "text-to-image"
    task: Task
    model: str | None = None  # always this model (model_id ignored)
    default_model: str | None = None  # with model_id from the body: used when none is sent (None: required)
    deploy_type: str | None = None  # update_s3 deploy type of its images (default: the family's)

    @property
    def takes_model_id(self) -> bool:
        return self.model is None


@dataclass(frozen=True)
class PathFamily:
    server: str  # recorded on each job it takes (job.server): names the job's fetch URL
    prefix: str  # e.g. "/api/v1/enterprise/flux_klein"
    actions: tuple[Action, ...]
    deploy_type: str  # update_s3 deploy type of its images
    fetch: str = "fetch/{id}"  # under the prefix; every fetch route answers every job of the key
    admin: bool = False  # serves the enterprise admin actions (system_details, clear_cache, ...)
    min_side: int = MIN_SIDE  # width/height from this to 1024 ...
    side_multiple: int = SIDE_MULTIPLE  # ... in steps of this
    tags: tuple[str, ...] = field(default=())

    @property
    def fetch_path(self) -> str:
        return f"{self.prefix}/{self.fetch}"

    @property
    def admin_name(self) -> str:
        """The enterprise server name in ``/api/v1/enterprise/<name>/<admin action>``."""
        return self.prefix.rsplit("/", 1)[1]

    def deploy_type_of(self, action: Action) -> str:
        return action.deploy_type or self.deploy_type


T2I, I2I, INPAINT = Task.TEXT2IMG, Task.IMG2IMG, Task.INPAINT
ENTERPRISE, V6, V7 = "/api/v1/enterprise", "/api/v6", "/api/v7"


def _fixed(model: str, *tasks: Task) -> tuple[Action, ...]:
    return tuple(Action(task.value, task, model=model) for task in tasks)


PATH_FAMILIES: tuple[PathFamily, ...] = (
    # -- enterprise servers: one model each, admin actions -------------------------------------
    PathFamily("flux_klein", f"{ENTERPRISE}/flux_klein", _fixed("flux-klein", T2I, I2I, INPAINT),
               deploy_type="flux", admin=True),
    # the realtime docs allow sizes from 1 (integrations send 64+): any size from 64 is answered exactly
    PathFamily("realtime", f"{ENTERPRISE}/realtime", _fixed("realtime", T2I, I2I, INPAINT),
               deploy_type="realtime", admin=True, min_side=REALTIME_MIN_SIDE, side_multiple=1),
    PathFamily("flux", f"{ENTERPRISE}/flux", _fixed("flux", T2I, I2I, INPAINT), deploy_type="flux", admin=True),
    PathFamily("flux_kontext_dev", f"{ENTERPRISE}/flux_kontext_dev", _fixed("flux-kontext-dev", I2I, INPAINT),
               deploy_type="image_editing", admin=True),
    # the official SDK's Community(enterprise=True): model_id from the body
    PathFamily("images", f"{ENTERPRISE}/images", (
        Action("text2img", T2I, default_model="flux", deploy_type="text_to_image"),
        Action("img2img", I2I, default_model="flux-kontext-dev"),
        Action("inpaint", INPAINT, default_model="flux"),
    ), deploy_type="image_editing", admin=True),
    # -- v6: realtime (the SDK's non-enterprise Realtime) and images (Community, Kontext) -----------
    PathFamily("v6_realtime", f"{V6}/realtime", _fixed("realtime", T2I, I2I, INPAINT), deploy_type="realtime",
               min_side=REALTIME_MIN_SIDE, side_multiple=1),
    PathFamily("v6", f"{V6}/images", (
        Action("text2img", T2I, default_model="flux", deploy_type="text_to_image"),
        Action("img2img", I2I),  # model_id required (ModelsLab's Kontext page)
        Action("inpaint", INPAINT, default_model="flux"),
    ), deploy_type="image_editing"),
    # -- v7: what the official CLI (modelslab-cli) calls ---------------------------------------------
    PathFamily("v7", f"{V7}/images", (
        Action("text-to-image", T2I, default_model="flux-klein"),
        Action("image-to-image", I2I, default_model="flux-kontext-dev"),
        Action("inpaint", INPAINT, default_model="flux-klein"),
    ), deploy_type="text_to_image"),
)

#: Further fetch routes clients call: ``{id}`` in the path, or the id as ``request_id`` in the body.
FETCH_ALIASES = (f"{V6}/fetch/{{id}}", f"{V6}/image_editing/fetch/{{id}}")
FETCH_BY_BODY = (f"{V6}/images/fetch", f"{ENTERPRISE}/fetch")

#: The OpenAI Images API (``api.openai``, ``/v1/``): the server name its jobs record, and the model
#: used when a request names none (it does text to image, editing with 1-4 images and inpainting).
OPENAI_SERVER = "openai"
OPENAI_DEFAULT_MODEL = "flux-klein"

BY_SERVER = {family.server: family for family in PATH_FAMILIES}
ADMIN_SERVERS = tuple(family.admin_name for family in PATH_FAMILIES if family.admin)


def deploy_type(server: str, action_name: str | None = None) -> str | None:
    """The update_s3 deploy type of a job taken by ``server`` (through ``action_name``)."""
    family = BY_SERVER.get(server)
    if family is None:
        return None
    action = next((a for a in family.actions if a.name == action_name), None)
    return family.deploy_type_of(action) if action else family.deploy_type


def _check_table() -> None:
    """A family whose models don't exist or can't do its actions fails at import, not at a request."""
    servers = [family.server for family in PATH_FAMILIES]
    assert len(servers) == len(set(servers)), "duplicate server names"
    for family in PATH_FAMILIES:
        for action in family.actions:
            for model in filter(None, (action.model, action.default_model)):
                spec = DEFAULT_REGISTRY.get(model)
                assert spec is not None, f"{family.prefix}/{action.name}: unknown model {model}"
                assert spec.supports(action.task), f"{family.prefix}/{action.name}: {model} can't {action.task.value}"
    assert OPENAI_SERVER not in servers, "the OpenAI API's server name is taken"
    openai_default = DEFAULT_REGISTRY.get(OPENAI_DEFAULT_MODEL)
    assert openai_default is not None and all(openai_default.supports(task) for task in Task), "OpenAI default model"


_check_table()
