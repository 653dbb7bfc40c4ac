"""malt_jax.roles: the one definition of the three roles, used by every module that names them."""

import pytest

from malt_jax import roles


def test_names_and_conversions():
    assert roles.ROLES == ("G", "V", "R") and roles.NAMES == ("generator", "verifier", "refiner")
    assert roles.ROLE_NAMES == {"G": "generator", "V": "verifier", "R": "refiner"}
    assert roles.role_name("g") == "generator"
    assert roles.role_name("V") == "verifier"
    assert roles.role_name(" Refiner ") == "refiner"
    assert [roles.role_letter(n) for n in roles.NAMES] == list(roles.ROLES) == [roles.role_letter(r) for r in "gvr"]
    assert roles.as_role_name("threshold") is None
    with pytest.raises(ValueError, match=r"unknown role 'critic'"):
        roles.role_name("critic")


def test_every_module_uses_the_one_definition():
    from malt_jax.credit import values as credit
    from malt_jax.evaluation import report
    from malt_jax.stages import credit as credit_stage
    from malt_jax.tasks import prompts
    from malt_jax.workflows import pipeline, summary

    assert pipeline.ROLES is roles.ROLES and pipeline.ROLE_NAMES is roles.ROLE_NAMES
    assert summary.ROLES is roles.ROLES and credit_stage.ROLES is roles.ROLES
    assert credit.NAMES is roles.NAMES and report.NAMES is roles.NAMES
    assert prompts.role_name is roles.role_name
