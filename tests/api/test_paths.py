"""The path-family table is the one source of the routes: every family's actions and fetch route
are served, its admin actions answer, its deploy type reaches the job, and /docs shows the answer
shapes and the status codes the routes really send."""

from __future__ import annotations

import pytest

from fluxserve.api.paths import ADMIN_SERVERS, BY_SERVER, FETCH_ALIASES, FETCH_BY_BODY, PATH_FAMILIES, deploy_type


@pytest.fixture(scope="module")
def openapi(server):
    with server.client() as client:
        return client.get("/openapi.json").json()


def test_every_family_in_the_table_is_routed(openapi):
    paths = openapi["paths"]
    for family in PATH_FAMILIES:
        for action in family.actions:
            assert "post" in paths[f"{family.prefix}/{action.name}"], (family.server, action.name)
        assert "post" in paths[family.fetch_path.replace("{id}", "{job_id}")]
    for path in FETCH_ALIASES:
        assert "post" in paths[path.replace("{id}", "{job_id}")]
    for path in FETCH_BY_BODY:
        assert "post" in paths[path]


def test_the_docs_show_answer_shapes_and_real_status_codes(openapi):
    operation = openapi["paths"]["/api/v6/images/text2img"]["post"]
    responses = operation["responses"]
    assert {"200", "400", "401", "404", "429", "500"} <= set(responses)
    assert "422" not in responses  # validation errors are answered 400 (ModelsLab's shape)
    success = responses["200"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[1] for item in success["anyOf"]}
    assert refs == {"SuccessAnswer", "ProcessingAnswer"}
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorAnswer")
    schemas = openapi["components"]["schemas"]
    assert {"future_links", "fetch_result", "eta"} <= set(schemas["ProcessingAnswer"]["properties"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert schemas[body]["example"]["prompt"]  # the seed pages' example body


@pytest.mark.parametrize("server_name", ADMIN_SERVERS)
def test_every_admin_server_of_the_table_answers(server, server_name):
    with server.client() as client:
        details = client.post(f"/api/v1/enterprise/{server_name}/system_details", json={"key": server.admin_key})
    assert details.status_code == 200 and details.json()["status"] == "ok"


def test_admin_actions_only_on_admin_servers(server):
    with server.client() as client:
        answer = client.post("/api/v1/enterprise/v7/system_details", json={"key": server.admin_key})
    assert answer.status_code == 404


def test_deploy_types_come_from_the_table():
    assert deploy_type("flux_klein", "text2img") == "flux"
    assert deploy_type("v6", "text2img") == "text_to_image" and deploy_type("v6", "img2img") == "image_editing"
    assert deploy_type("realtime") == "realtime" and deploy_type("unknown") is None
    assert BY_SERVER["realtime"].min_side == 64 and BY_SERVER["v6"].min_side == 256
