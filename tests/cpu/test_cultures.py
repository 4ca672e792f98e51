"""Culture registry from pycountry + Babel.  python -m pytest tests/cpu/test_cultures.py -v"""

import pytest

from cm_ray.cultures import get_culture, normalize_culture, registry


def test_registry_has_over_200_cultures_with_locales():
    reg = registry()
    assert len(reg) >= 200
    for key, c in reg.items():
        assert key == c.key and len(key) == 2 and key.isupper()
        assert c.languages and c.locale.endswith(f"-{key}")


@pytest.mark.parametrize("alias,key", [("MEX", "MX"), ("mx", "MX"), ("Mexico", "MX"),
                                       ("South Korea", "KR"), ("UK", "GB"), ("USA", "US")])
def test_aliases_normalise_to_one_key(alias, key):
    assert normalize_culture(alias) == key


def test_locale_and_language_come_from_cldr():
    assert get_culture("JP").locale == "ja-JP"
    assert get_culture("MX").language_name == "Spanish"
    assert "de" in get_culture("DE").languages


def test_unknown_culture_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown culture 'Atlantis'"):
        normalize_culture("Atlantis")
